"""Hugging Face folders (``config.json``, weights, tokenizer), with sentence-transformers pooling
when the folder has it; every malformed file is a one-line :class:`CorruptModelError`."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from lrt_deploy._unpickle import was_refused
from lrt_deploy.errors import CorruptModelError, ExampleInputsError, UnsupportedFormatError

from .archives import untrusted
from .model import LoadedModel, first_line

__all__ = ["load_huggingface"]

logger = logging.getLogger(__name__)

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_huggingface(folder: Path, max_length: int) -> LoadedModel:
    """Load a Hugging Face folder as a float32 text model with its tokenizer and example inputs."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UnsupportedFormatError(
            f"folder '{folder}' has no config.json: give a Hugging Face model folder "
            "(save_pretrained output) or a model file"
        )
    backbone, classifier = _load_backbone(folder, config_path)
    _upcast_to_float32(backbone, folder)
    tokenizer, tokenizer_file = _load_tokenizer(folder)
    pooling = _sentence_transformers_pooling(folder)
    example, axes = _example_inputs(backbone, tokenizer)
    module, fmt, kind, outputs = _head(backbone, pooling, classifier)
    return LoadedModel(
        module=module,
        format=fmt,
        name=folder.name,
        example_inputs=example,
        output_names=outputs,
        dynamic_axes=axes,
        kind=kind,
        tokenizer_file=tokenizer_file,
        tokenizer=tokenizer,
        attention_shape=_attention_shape(backbone.config),
        text_limits=_text_limits(backbone.config),
        max_length=min(
            max_length,
            getattr(tokenizer, "model_max_length", max_length),
            getattr(backbone.config, "max_position_embeddings", max_length),
        ),
    )


def _load_backbone(folder: Path, config_path: Path) -> tuple[Any, bool]:
    """The transformers model of ``folder`` and whether it is a sequence classifier."""
    try:
        from transformers import AutoModel, AutoModelForSequenceClassification
    except ImportError as exc:
        raise UnsupportedFormatError(
            "Hugging Face folders need transformers: pip install 'lrt-deploy[export]'"
        ) from exc
    from transformers.utils import logging as hf_logging

    # transformers draws a progress bar per weight file; the CLI prints its own stages.
    hf_logging.disable_progress_bar()
    architectures = _read_json(config_path, dict).get("architectures") or []
    if not isinstance(architectures, list):
        raise CorruptModelError(f"'{config_path}' has a malformed 'architectures' entry")
    # A classifier keeps its head so fidelity can be judged on its decisions (top-1, KL).
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    auto = AutoModelForSequenceClassification if classifier else AutoModel
    try:
        return auto.from_pretrained(folder, local_files_only=True), classifier
    except Exception as exc:  # transformers/safetensors/torch raise many types for bad folders
        if was_refused(exc) or "Unsupported global" in str(exc):
            raise untrusted(folder, "holds pickled weights that are not plain tensors") from None
        logger.debug("from_pretrained failed", exc_info=True)
        raise CorruptModelError(
            f"cannot load the Hugging Face model in '{folder}': {first_line(exc)}; check that "
            "config.json matches the weights and the weight files are complete"
        ) from exc
    finally:
        hf_logging.enable_progress_bar()


def _load_tokenizer(folder: Path) -> tuple[Any, Path | None]:
    """The folder's tokenizer and its ``tokenizer.json`` (None when only ``vocab.txt``)."""
    from transformers import AutoTokenizer

    tokenizer = None
    tokenizer_file: Path | None = folder / "tokenizer.json"
    if tokenizer_file.is_file() or (folder / "vocab.txt").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # tokenizers raises its own exception types for bad JSON
            raise CorruptModelError(
                f"cannot read the tokenizer in '{folder}': {first_line(exc)}; save it again "
                "with tokenizer.save_pretrained()"
            ) from exc
    if not tokenizer_file.is_file():
        tokenizer_file = None
    if tokenizer is None:
        raise ExampleInputsError(
            f"Hugging Face folder '{folder}' has no tokenizer files (tokenizer.json or vocab.txt); "
            "save the tokenizer next to the model with tokenizer.save_pretrained()"
        )
    return tokenizer, tokenizer_file


def _example_inputs(backbone: Any, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two tokenized sentences for the inputs ``forward`` takes, and their dynamic axes."""
    accepts = inspect.signature(backbone.forward).parameters
    input_names = [n for n in _TEXT_INPUTS if n in accepts]
    if getattr(backbone.config, "type_vocab_size", 0) in (0, None):
        input_names = [n for n in input_names if n != "token_type_ids"]
    sample = tokenizer(
        ["lrt-deploy exports low-rank transformers.", "A second, longer example sentence here."],
        padding=True,
        return_tensors="pt",
    )
    example = {name: sample[name] for name in input_names}
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    return example, axes


def _head(backbone: Any, pooling: tuple[str, bool] | None, classifier: bool
          ) -> tuple[Any, str, str, list[str]]:
    """The module to export, its format, kind and output names."""
    if pooling is not None:
        mode, normalize = pooling
        from lrt_deploy.nn.adapters import SentenceEmbedder

        return (SentenceEmbedder(backbone, mode, normalize), "sentence-transformers",
                "text-embedding", ["sentence_embedding"])
    if classifier:
        return backbone, "huggingface", "text-logits", ["logits"]
    return backbone, "huggingface", "text-hidden", ["last_hidden_state"]


def _text_limits(config: Any) -> dict[str, int] | None:
    """Vocabulary size and position count from a Hugging Face config, where it states them."""
    limits = {
        key: value
        for key, value in (
            ("vocab_size", getattr(config, "vocab_size", None)),
            ("max_sequence", getattr(config, "max_position_embeddings", None)),
        )
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
    }
    return limits or None


def _attention_shape(config: Any) -> tuple[int, int] | None:
    """(heads, hidden size) for the attention fusion, when the config states both."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and hidden % heads == 0:
        return heads, hidden
    return None


def _sentence_transformers_pooling(folder: Path) -> tuple[str, bool] | None:
    """(pooling mode, normalize) when the folder is a sentence-transformers model."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, list)
    mode, normalize = "mean", False
    for entry in modules:
        kind = entry.get("type", "") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or not isinstance(entry.get("path", ""), str):
            raise CorruptModelError(
                f"'{modules_file}' entries must be objects with a 'type' and a 'path': save the "
                "model again with sentence-transformers"
            )
        if kind.endswith("Pooling"):
            pooling_config = folder / entry.get("path", "") / "config.json"
            if pooling_config.is_file():
                options = _read_json(pooling_config, dict)
                if options.get("pooling_mode_cls_token"):
                    mode = "cls"
        elif kind.endswith("Normalize"):
            normalize = True
    return mode, normalize


def _upcast_to_float32(backbone: Any, folder: Path) -> None:
    """Compute in float32 whatever the weight files store (upcasting is exact).

    PyTorch's CPU kernels fail on mixed dtypes (a float32 low-rank factor next to a float16
    LayerNorm), and export, quantisation and fidelity checks expect float32.
    """
    import torch

    stored = {p.dtype for p in backbone.parameters() if p.is_floating_point()}
    if stored and stored != {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored))
        logger.info("'%s' stores %s weights; computing in float32", folder, names)
        backbone.float()


def _read_json(path: Path, kind: type) -> Any:
    """Parse a JSON file of the model folder that must hold a ``kind`` (dict or list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptModelError(
            f"'{path}' is not valid JSON ({type(exc).__name__}): restore the file from the "
            "model's source"
        ) from None
    if not isinstance(data, kind):
        raise CorruptModelError(
            f"'{path}' holds a JSON {type(data).__name__}, not an {kind.__name__}: restore the "
            "file from the model's source"
        )
    return data
