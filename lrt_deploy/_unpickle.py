"""Restricted unpickling for archives that bundle pickles with their graph (``torch.export`` .pt2).

``torch.export.load`` reads a JSON graph, but example inputs, constants and some weights inside
the archive are pickles, and torch unpickles several of them with full ``pickle`` (and retries a
failed ``weights_only`` load without it). A crafted archive can therefore run code while loading.
:func:`weights_only_unpickling` closes every such door for the duration of a load: whatever torch
unpickles is limited to what ``torch.load(weights_only=True)`` allows (tensors, containers,
primitives), and plain ``pickle`` loads are refused. Anything that needs more raises
:class:`RefusedPickle`, which the loader reports as an untrusted file.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["RefusedPickle", "was_refused", "weights_only_unpickling"]

# The patches are process-wide; one restricted load at a time keeps them consistent.
_LOCK = threading.Lock()


class RefusedPickle(pickle.UnpicklingError):
    """An unpickle that needs more than ``weights_only`` allows was attempted and refused."""


def _refuse(*_: Any, **__: Any) -> Any:
    raise RefusedPickle(
        "Unsupported global: the archive holds a pickle that is not plain tensors/containers"
    )


def was_refused(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from or during, is a refused pickle."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RefusedPickle):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Within this block every unpickle goes through torch's ``weights_only`` unpickler.

    Patched, and restored on exit: ``torch.load`` (``weights_only`` forced on, so torch's own
    fall-back to a full unpickle fails too), ``pickle.load``/``pickle.loads`` and torch's
    TorchScript-object unpickler (refused outright).
    """
    import torch

    real_load = torch.load

    def load_weights_only(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            # Only an unsupported global (a callable to import and run) means "needs more than
            # weights"; anything else is a damaged pickle and stays what it is.
            if "Unsupported global" in str(exc):
                raise RefusedPickle(str(exc).strip().splitlines()[0]) from exc
            raise

    patches: list[tuple[Any, str, Any]] = [
        (torch, "load", load_weights_only),
        (pickle, "load", _refuse),
        (pickle, "loads", _refuse),
        (torch._C, "_pickle_load_obj", _refuse),
    ]
    with _LOCK:
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        try:
            for owner, name, replacement in patches:
                setattr(owner, name, replacement)
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)
