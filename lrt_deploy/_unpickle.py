"""Restricted unpickling for archives that carry pickles beside their graph (``.pt2``).

``torch.export.load`` unpickles some entries with full ``pickle`` (and retries a failed
``weights_only`` load without it), so a crafted archive could run code while loading.
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
    """Within this block ``torch.load`` is forced to ``weights_only`` and plain ``pickle`` and
    TorchScript-object unpickling are refused (:class:`RefusedPickle`)."""
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
