"""The whole job: load -> (compress) -> export -> validate -> optimise -> quantise -> package ->
measure against the dense baseline -> write the bundle atomically.

Each step is a function of its own package; this module only composes them, so the CLI and
Python users run the same code (``lrt_deploy.export_bundle``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.errors import BundleExistsError, LrtDeployError, UnsupportedOperationError
from lrt_deploy.export.graph import default_opset, model_bytes
from lrt_deploy.export.targets import Target

if TYPE_CHECKING:
    from lrt_deploy.compress import FactorizationResult, LowRankConfig
    from lrt_deploy.load import LoadedModel

__all__ = ["BenchmarkSettings", "BundleResult", "export_bundle", "read_text_lines"]

logger = logging.getLogger(__name__)

TOOL_VERSION = "0.1.0"


@dataclass(frozen=True)
class BenchmarkSettings:
    """How latency and fidelity are measured for every variant (identical for all of them)."""

    batch: int = 1
    sequence: int = 128
    threads: int = 2
    warmup: int = 5
    runs: int = 30
    eval_batch: int = 16
    #: True when the graph's batch is fixed, so non-text example inputs are resized to ``batch``.
    fixed_batch: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Variant:
    """One built graph and what was measured on it."""

    key: str
    label: str
    onnx_path: Path
    is_baseline: bool = False
    deployed: bool = False
    validation: list[dict[str, Any]] = field(default_factory=list)
    optimization: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    fidelity: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    file_bytes: int = 0
    params: int | None = None
    provider: dict[str, Any] = field(default_factory=dict)


@dataclass
class BundleResult:
    """What ``export_bundle`` wrote and measured."""

    out_dir: Path
    manifest: dict[str, Any]
    report: Any
    variants: list[Variant]
    factorization: FactorizationResult | None = None


ProgressFn = Callable[[str], None]


def _noop(_: str) -> None:
    return None


def read_text_lines(path: str | Path | None, default: str) -> list[str]:
    """Non-empty lines of ``path``, or of the shipped corpus file ``default``."""
    if path is None:
        text = resources.files("lrt_deploy.data").joinpath(default).read_text(encoding="utf-8")
    else:
        file = Path(path)
        if not file.is_file():
            raise LrtDeployError(f"calibration file '{file}' does not exist")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LrtDeployError(
                f"calibration file '{file}' is not UTF-8 text: give one sentence per line, or an "
                ".npz of named input arrays"
            ) from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise LrtDeployError(f"calibration file '{path}' has no text lines")
    return lines


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_npz_inputs(loaded: LoadedModel, calibration: str | Path) -> dict[str, np.ndarray]:
    """One checked array per model input from an ``.npz``: readable without pickle, numeric,
    at least one batch axis, the example input's rank and kind, one row count, ids in range."""
    import zipfile

    path = Path(calibration)
    if not path.is_file():
        raise LrtDeployError(f"calibration file '{path}' does not exist")
    fix = "save one array per input with numpy.savez(path, input_name=array, ...)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single array, not named arrays")
            missing = [n for n in loaded.input_names if n not in data.files]
            if missing:
                raise LrtDeployError(
                    f"calibration file '{path}' lacks inputs {', '.join(missing)}; it must hold "
                    f"one array per model input ({', '.join(loaded.input_names)})"
                )
            arrays = {n: np.asarray(data[n]) for n in loaded.input_names}
    except LrtDeployError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrtDeployError(
            f"calibration file '{path}' is not a readable .npz of numeric arrays ({reason}): "
            f"{fix}"
        ) from None
    rows = set()
    vocab = (loaded.text_limits or {}).get("vocab_size")
    for name, array in arrays.items():
        example = loaded.example_inputs[name]
        expected = str(example.dtype).removeprefix("torch.")
        integer = not example.dtype.is_floating_point
        problem = None
        if array.ndim != example.dim():
            problem = f"has {array.ndim} axes but the model's input has {example.dim()}"
        elif array.ndim == 0 or array.shape[0] == 0:
            problem = "has no rows"
        elif array.dtype.kind not in "biuf":
            problem = f"has dtype {array.dtype} (numbers only)"
        elif integer and array.dtype.kind == "f":
            problem = f"holds floats but the model takes {expected}"
        elif name == "input_ids" and vocab and (array.min() < 0 or array.max() >= vocab):
            problem = f"holds ids outside the vocabulary [0, {vocab - 1}]"
        elif integer and array.dtype.kind == "i" and array.min() < 0 and name.endswith("ids"):
            problem = "holds negative ids"
        if problem:
            raise LrtDeployError(f"calibration input '{name}' in '{path}' {problem}: {fix}")
        rows.add(array.shape[0])
        arrays[name] = array.astype(expected, copy=False)
    if len(rows) > 1:
        raise LrtDeployError(
            f"calibration inputs in '{path}' have different row counts {sorted(rows)}: give "
            "every input the same number of rows"
        )
    return arrays


def calibration_batches(
    loaded: LoadedModel, calibration: str | Path | None, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Named input batches for activation statistics: text lines (shipped corpus by default) for
    text models, an ``.npz`` of named arrays for any model."""
    import torch

    if calibration is not None and str(calibration).endswith(".npz"):
        arrays = {n: torch.from_numpy(a) for n, a in read_npz_inputs(loaded, calibration).items()}
        count = next(iter(arrays.values())).shape[0]
        return [
            {n: a[i : i + batch_size] for n, a in arrays.items()}
            for i in range(0, count, batch_size)
        ]
    if not loaded.is_text:
        if calibration is not None:
            raise LrtDeployError(
                "text calibration needs a text model; for this model give an .npz of named inputs"
            )
        raise UnsupportedOperationError(
            "activation-aware factorization needs calibration data for a non-text model: pass "
            "--calibration inputs.npz (one array per input) or use --solver svd"
        )
    lines = read_text_lines(calibration, "calibration.txt")
    return [loaded.tokenize(chunk) for chunk in _chunks(lines, batch_size)]


def evaluation_batches(
    loaded: LoadedModel, settings: BenchmarkSettings, fixed_shape: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Held-out inputs for fidelity: the shipped held-out corpus for text models (never used for
    calibration), the example inputs otherwise. A fixed-shape graph gets batches of its shape."""
    if not loaded.is_text:
        return [_example_at_batch(loaded, (fixed_shape or {}).get("batch"))]
    lines = read_text_lines(None, "heldout.txt")
    if fixed_shape:
        size = fixed_shape.get("batch", settings.eval_batch)
        pad_to = fixed_shape.get("sequence")
        return [
            loaded.tokenize(chunk, pad_to=pad_to)
            for chunk in _chunks(lines, size)
            if len(chunk) == size
        ]
    return [loaded.tokenize(chunk) for chunk in _chunks(lines, settings.eval_batch)]


def _example_at_batch(loaded: LoadedModel, batch: int | None) -> dict[str, Any]:
    """The example inputs, cut or repeated along the batch axis to ``batch`` rows."""
    import torch

    example = dict(loaded.example_inputs)
    if batch is None:
        return example
    resized = {}
    for name, tensor in example.items():
        if tensor.dim() == 0 or 0 not in loaded.dynamic_axes.get(name, {}):
            resized[name] = tensor
            continue
        repeats = -(-batch // tensor.shape[0])
        resized[name] = torch.cat([tensor] * repeats, dim=0)[:batch]
    return resized


def latency_inputs(loaded: LoadedModel, settings: BenchmarkSettings) -> dict[str, np.ndarray]:
    """The fixed batch the latency of every variant is measured on."""
    if loaded.is_text:
        lines = read_text_lines(None, "heldout.txt")
        text = " ".join(lines)  # long enough to fill the sequence without padding
        encoded = loaded.tokenize([text] * settings.batch, pad_to=settings.sequence)
        return {n: t.numpy() for n, t in encoded.items()}
    example = _example_at_batch(loaded, settings.batch if settings.fixed_batch else None)
    return {n: t.detach().numpy() for n, t in example.items()}


def _validation_batches(loaded: LoadedModel, evaluation: list[dict[str, Any]]) -> list[dict]:
    # The export example plus held-out batches of other shapes, so baked-in shapes are caught.
    return [dict(loaded.example_inputs), *evaluation[:2]]


def _fidelity(
    loaded: LoadedModel, reference: list[np.ndarray], candidate: list[np.ndarray],
    masks: list[np.ndarray | None],
) -> dict[str, float]:
    from lrt_deploy.compress.fidelity import cosine_per_row, sqnr_db

    cosines = []
    for ref, cand, mask in zip(reference, candidate, masks, strict=True):
        if loaded.kind == "text-hidden" and mask is not None:
            keep = mask.astype(bool)
            ref, cand = ref[keep], cand[keep]
        cosines.append(cosine_per_row(ref, cand))
    values = np.concatenate(cosines)
    ref_all = np.concatenate([r.reshape(-1) for r in reference])
    cand_all = np.concatenate([c.reshape(-1) for c in candidate])
    metrics = {
        "mean_cosine": float(values.mean()),
        "worst_cosine": float(values.min()),
        "sqnr_db": float(sqnr_db(ref_all, cand_all)),
    }
    if loaded.kind == "text-logits":
        from lrt_deploy.compress.fidelity import kl_divergence, top1_agreement

        ref_logits, cand_logits = np.concatenate(reference), np.concatenate(candidate)
        metrics["top1_agreement"] = top1_agreement(ref_logits, cand_logits)
        metrics["kl_divergence"] = kl_divergence(ref_logits, cand_logits)
    return metrics


def _count_params(module: Any) -> int | None:
    import torch

    if isinstance(module, torch.nn.Module):
        return sum(p.numel() for p in module.parameters())
    return None


def _prepare_out_dir(out_dir: Path, force: bool, source: Path | None) -> None:
    """Refuse output folders whose replacement would destroy something that is not a bundle:
    the input model (or a folder holding it, or one inside it), the working directory or one of
    its parents, or any existing folder that is not an lrt-deploy bundle."""
    if str(out_dir).strip() in ("", "."):
        raise BundleExistsError(
            "the output folder cannot be the working directory: give -o a new folder name"
        )
    resolved = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        raise BundleExistsError(
            f"output folder '{out_dir}' is the working directory or contains it: give -o a new "
            "folder"
        )
    if source is not None:
        src = source.resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise BundleExistsError(
                f"output folder '{out_dir}' is, holds or lies inside the input model '{source}': "
                "write the bundle somewhere else with -o"
            )
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise BundleExistsError(
            f"output folder '{out_dir}' already exists: pass --force to replace it or choose "
            "another -o"
        )
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise BundleExistsError(
            f"output path '{out_dir}' is a file or a link: choose a folder with -o"
        )
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise BundleExistsError(
            f"'{out_dir}' exists and is not an lrt-deploy bundle (no manifest.json): --force "
            "replaces only bundles; choose another -o"
        )


def _missing_ancestors(path: Path) -> list[Path]:
    """Folders above ``path`` that do not exist yet, nearest first (to remove on failure)."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _write_error(exc: BaseException, out_dir: Path) -> LrtDeployError | None:
    """A failure to write files (full disk, read-only or vanished folder), as a user error."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    elif "serialization failed" in str(exc).lower() or "no space left" in str(exc).lower():
        # onnxruntime and protobuf report a failed write of a graph this way.
        reason = str(exc).strip().splitlines()[0]
    else:
        return None
    try:
        free = shutil.disk_usage(out_dir.absolute().parent).free
        where = f" ({free / 2**20:.0f} MiB free there)"
    except OSError:
        where = ""
    return LrtDeployError(
        f"cannot write the bundle under '{out_dir.absolute().parent}'{where}: {reason}; free "
        "space or choose another -o"
    )


def _check_fixed_shape(loaded: LoadedModel, target: Target) -> None:
    """A fixed sequence must fit the model's positions (an oversized one fails deep in export)."""
    sequence = target.fixed_shape.get("sequence")
    limit = (loaded.text_limits or {}).get("max_sequence")
    if sequence and limit and sequence > limit:
        raise LrtDeployError(
            f"--fixed-shape sequence={sequence} exceeds the {limit} positions the model has: "
            f"use at most sequence={limit}"
        )


def _commit(staging: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an existing one (with --force) is replaced whole."""
    # mkdtemp/mkstemp create private (0700/0600) entries; a bundle is shared like any output.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=".lrt-old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def export_bundle(
    loaded: LoadedModel,
    out_dir: str | Path,
    target: Target,
    *,
    compress: LowRankConfig | None = None,
    calibration: str | Path | None = None,
    settings: BenchmarkSettings | None = None,
    force: bool = False,
    heal_steps: int = 0,
    fidelity_floor: float | None = None,
    progress: ProgressFn = _noop,
) -> BundleResult:
    """Build a deployment bundle for ``loaded`` and measure it against the dense baseline.

    Args:
        loaded: From :func:`lrt_deploy.load_model`. Compression modifies ``loaded.module``.
        out_dir: Bundle folder; written atomically (nothing is left behind on failure).
        target: A :class:`Target` preset, possibly overridden.
        compress: Factorize the model first with this config (``None``: export as it is).
        calibration: Text lines or ``.npz`` for activation-aware factorization.
        settings: Benchmark settings shared by all variants.
        force: Replace ``out_dir`` if it exists.
        heal_steps: After factorizing, distil towards the dense model for this many steps
            (keeps the best step; never worse than before).
        fidelity_floor: With a budget config: search the smallest budget whose model keeps
            this mean cosine to the dense model on a calibration split.
        progress: Called with a short line as each stage starts.

    Returns:
        The manifest, report and per-variant measurements.
    """
    settings = settings or BenchmarkSettings()
    if target.fixed_shape:
        # Latency is measured at the shape the graph is fixed to.
        settings = dataclasses.replace(
            settings,
            batch=target.fixed_shape.get("batch", settings.batch),
            sequence=target.fixed_shape.get("sequence", settings.sequence),
            fixed_batch="batch" in target.fixed_shape,
        )
    if loaded.is_text and settings.sequence > loaded.max_length:
        logger.warning(
            "latency sequence %d exceeds the model's maximum length %d; measuring at %d",
            settings.sequence, loaded.max_length, loaded.max_length,
        )
        settings = dataclasses.replace(settings, sequence=loaded.max_length)
    out_dir = Path(out_dir)
    _check_fixed_shape(loaded, target)
    _prepare_out_dir(out_dir, force, loaded.source_path)
    created = _missing_ancestors(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lrt-export-", dir=out_dir.parent))
    except OSError as exc:
        _remove_if_empty(created)
        raise BundleExistsError(
            f"cannot create the output folder '{out_dir}': {exc.strerror or exc}; choose another -o"
        ) from exc
    try:
        if compress is not None and not loaded.can_compress:
            raise UnsupportedOperationError(
                f"--rank needs an nn.Module to factorize, but '{loaded.name}' is a "
                f"{loaded.format} graph whose layers cannot be swapped: export it without "
                "--rank, or load the original module (.pt with --trust-pickle, or a Hugging "
                "Face folder)"
            )
        qdq = bool(target.quantize) and target.quant_format == "qdq"
        # Read once: factorization, healing, the budget search and static int8 share it.
        batches: list[dict[str, Any]] = []
        if qdq or (compress is not None and (
            compress.solver == "asvd" or heal_steps or fidelity_floor is not None
        )):
            progress("reading calibration data")
            batches = calibration_batches(loaded, calibration)
        factorization, compression = None, {}
        dense_loaded = loaded
        if compress is not None:
            factorization, dense_loaded, compression = _compress(
                loaded, compress, batches, progress, heal_steps, fidelity_floor
            )

        progress("preparing held-out evaluation data")
        evaluation = evaluation_batches(loaded, settings)
        measured = (
            evaluation_batches(loaded, settings, dict(target.fixed_shape))
            if target.fixed_shape
            else evaluation
        )
        primary = loaded.output_names[0]
        ref_arrays = [dense_loaded.forward(batch)[primary].numpy() for batch in measured]
        masks = [
            b["attention_mask"].numpy() if "attention_mask" in b else None for b in measured
        ]

        work = staging / ".work"
        work.mkdir()
        # A factorized model is compared with its dense original; a model that is low-rank
        # by design has no dense twin and is its own baseline.
        design_layers = _lowrank_by_design(loaded) if compress is None else []
        plan = [] if design_layers else [("dense", "dense", dense_loaded)]
        if compress is not None or design_layers:
            plan.append(("lrt", "LRT", loaded))
        feeds = latency_inputs(loaded, settings)
        variants: list[Variant] = []
        calibration_feeds = (
            [{n: t.numpy() for n, t in batch.items()} for batch in batches] if qdq else None
        )
        for key, label, model in plan:
            variants.extend(_build_variants(
                key, label, model, plan_size=len(plan), target=target, work=work,
                evaluation=evaluation, check_feeds=feeds,
                calibration_feeds=calibration_feeds, progress=progress,
            ))
        deployed = variants[-1]
        deployed.deployed = True

        progress(
            f"measuring {len(variants)} variants: batch {settings.batch}, sequence "
            f"{settings.sequence}, {settings.threads} threads"
        )
        for index, variant in enumerate(variants):
            # A provider fallback is warned about once (it is the same for every variant) and
            # written into the report's header for each run.
            quiet = ("lrt_deploy.runtime",) if index > 0 else ()
            with quiet_loggers(*quiet):
                _measure(variant, loaded, measured, ref_arrays, masks, feeds, target, settings)
            if index == 0 and variant.provider.get("fell_back"):
                progress(f"provider fallback: {variant.provider.get('message')}")

        progress("packaging the bundle")
        manifest = _write_bundle(
            staging, loaded, target, variants, deployed, settings, feeds,
            _lowrank_section(factorization, compression, design_layers),
        )
        report = _build_report(loaded, target, variants, factorization, settings, manifest)
        report.write(staging)
        shutil.rmtree(work)
        _commit(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(created)
        translated = None if isinstance(exc, LrtDeployError) else _write_error(exc, out_dir)
        if translated is not None:
            raise translated from exc
        raise
    return BundleResult(out_dir, manifest, report, variants, factorization)


def _build_report(
    loaded: LoadedModel,
    target: Target,
    variants: list[Variant],
    factorization: FactorizationResult | None,
    settings: BenchmarkSettings,
    manifest: dict[str, Any],
) -> Any:
    from lrt_deploy.report import ComparisonReport, VariantResult

    # Notes on how the low-rank model was made are shown once, under its first row.
    first_lrt = next((v for v in variants if v.label.startswith("LRT")), None)
    results = [
        VariantResult(
            name=v.label + (" (deployed)" if v.deployed else ""),
            file_bytes=v.file_bytes,
            is_baseline=v.is_baseline,
            params=v.params,
            latency=v.latency,
            fidelity=v.fidelity,
            provider_report=v.provider,
            notes=_compression_notes(manifest) if v is first_lrt else [],
        )
        for v in variants
    ]
    provider = variants[0].provider
    what = (
        "sentence embeddings" if loaded.kind == "text-embedding"
        else "hidden states of real tokens" if loaded.kind == "text-hidden"
        else "logits (and their top-1 and KL)" if loaded.kind == "text-logits"
        else f"output '{loaded.output_names[0]}' rows"
    )
    source = (
        "the shipped held-out sentences (heldout.txt, never used for calibration)"
        if loaded.is_text
        else "the example inputs"
    )
    reference = (
        "dense PyTorch fp32 model" if factorization is not None else "PyTorch fp32 model"
    )
    layers = []
    if manifest.get("lowrank"):
        for layer in manifest["lowrank"]["layers"]:
            layers.append({
                "name": layer["name"],
                "shape": layer.get("shape"),
                "rank": layer.get("rank"),
                "action": layer.get("action", "low-rank by design"),
                "reason": layer.get("reason", ""),
            })
    messages = sorted({v.provider.get("message") for v in variants if v.provider.get("message")})
    return ComparisonReport(
        model=f"{loaded.name} ({loaded.format}) -> target {target.name}",
        variants=results,
        settings={
            **(
                {"batch": settings.batch, "sequence": settings.sequence}
                if loaded.is_text
                else {"inputs": ", ".join(
                    f"{n} {tuple(t.shape)}" for n, t in loaded.example_inputs.items()
                )}
            ),
            "threads": settings.threads,
            "provider_requested": provider.get("requested"),
            "provider_active": provider.get("active"),
            "fidelity_inputs": f"cosine of {what} vs the {reference} on {source}",
        },
        layers=layers,
        optimisation={
            v.label: v.optimization.get("fused", {}) for v in variants if v.optimization
        },
        quantisation=next((v.quantization for v in variants if v.quantization), {}) or {},
        provider_messages=messages,
    )


def _compression_notes(manifest: dict[str, Any]) -> list[str]:
    """Budget search and healing, as lines under the table."""
    lowrank = manifest.get("lowrank") or {}
    notes = []
    search = lowrank.get("budget_search")
    if search:
        tried = ", ".join(f"{t['budget']:.3f}: {t['mean_cosine']:.4f}" for t in search["trials"])
        notes.append(
            f"budget {search['budget']:.3f} is the smallest tried with mean cosine >= "
            f"{search['floor']} on the {search['selection_data']} (tried {tried})"
        )
    healing = lowrank.get("healing")
    if healing:
        notes.append(
            f"healed {healing['steps_run']} steps in {healing['seconds']:.0f}s, kept step "
            f"{healing['best_step']}; mean cosine on the {healing['selection_data']} "
            f"{healing['before']['mean_cosine']:.4f} -> {healing['after']['mean_cosine']:.4f}"
        )
    return notes


def _lowrank_by_design(loaded: LoadedModel) -> list[dict[str, Any]]:
    """Low-rank units the model was built with, read from its modules or, for graphs whose
    module classes are gone (.pt2, TorchScript), from the shapes of its weights."""
    import torch

    from lrt_deploy.nn import lowrank_layers_in_weights, lowrank_rank

    module = loaded.module
    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        return [
            {
                "name": name,
                "rank": lowrank_rank(sub),
                "type": type(sub).__name__,
                "action": "low-rank by design",
            }
            for name, sub in module.named_modules()
            if lowrank_rank(sub) is not None
        ]
    state = module.state_dict() if callable(getattr(module, "state_dict", None)) else {}
    if isinstance(module, torch.export.ExportedProgram):
        state = dict(module.state_dict)
    return [{**layer, "action": "low-rank by design"} for layer in lowrank_layers_in_weights(state)]


def describe_config(config: LowRankConfig) -> str:
    """A short description of what a factorization config asks for, for progress and errors."""
    if config.policy == "budget":
        what = f"budget {config.budget:g} of the candidate parameters"
    elif config.policy == "energy":
        what = f"energy {config.energy:g} of each layer's spectrum"
    else:
        what = f"rank {config.rank}"
    embeddings = ", embeddings too" if config.factorize_embeddings else ""
    return f"{config.solver}, {what}{embeddings}"


def _compress(
    loaded: LoadedModel, config: LowRankConfig, batches: list[dict[str, Any]],
    progress: ProgressFn, heal_steps: int = 0, fidelity_floor: float | None = None,
) -> tuple[FactorizationResult, LoadedModel, dict[str, Any]]:
    from lrt_deploy.compress import factorize_, search_budget

    dense_loaded = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
    # Choices made on data (the budget for a fidelity floor, the best healing step) are judged
    # on the last fifth of the calibration batches, never on the held-out test text.
    fit, select = _split(batches) if heal_steps or fidelity_floor is not None else (batches, [])
    solver_data = fit if config.solver == "asvd" else None
    extra: dict[str, Any] = {}
    if fidelity_floor is not None:
        progress(f"searching the smallest budget with mean cosine >= {fidelity_floor}")
        search = search_budget(
            loaded.module, config, solver_data, select, fidelity_floor, progress=progress
        )
        config = dataclasses.replace(config, budget=search.budget)
        extra["budget_search"] = {
            **search.to_dict(), "selection_data": "last fifth of the calibration batches",
        }
    progress(f"factorizing ({describe_config(config)})")
    result = factorize_(loaded.module, config, calibration=solver_data)
    extra["config"] = config.to_dict()
    if not result.factorized:
        reasons = "; ".join(sorted({d.reason for d in result.kept_dense})[:3])
        raise LrtDeployError(
            f"{describe_config(config)} saves parameters in no layer ({reasons}): choose a "
            "smaller rank or budget, e.g. --rank 0.25"
        )
    logger.info(result.summary())
    if heal_steps:
        extra["healing"] = _heal(loaded, dense_loaded, fit, select, heal_steps, progress)
    return result, dense_loaded, extra


def _split(batches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if len(batches) < 2:
        raise LrtDeployError(
            "--heal and --fidelity-floor need at least two calibration batches: give more "
            "calibration data"
        )
    split = max(1, len(batches) // 5)
    return batches[:-split], batches[-split:]


def _heal(
    loaded: LoadedModel, dense: LoadedModel, train: list[dict[str, Any]],
    select: list[dict[str, Any]], steps: int, progress: ProgressFn,
) -> dict[str, Any]:
    """Distil the factorized model towards the dense one on ``train``, keeping the step that
    does best on ``select``."""
    from lrt_deploy.compress import heal_

    progress(f"healing: {steps} distillation steps on {len(train)} calibration batches")
    result = heal_(
        loaded.module, dense.module, train, steps=steps, eval_batches=select,
        hidden_modules=_block_names(loaded.module), progress=True,
    )
    progress(
        f"healing kept step {result.best_step}: calibration-split mean cosine "
        f"{result.before_mean_cosine:.4f} -> {result.after_mean_cosine:.4f}"
    )
    return {
        "steps": steps,
        "steps_run": result.steps_run,
        "best_step": result.best_step,
        "seconds": result.seconds,
        "selection_data": "last fifth of the calibration batches",
        "before": {"mean_cosine": result.before_mean_cosine,
                   "worst_cosine": result.before_worst_cosine},
        "after": {"mean_cosine": result.after_mean_cosine,
                  "worst_cosine": result.after_worst_cosine},
        "stopped_early": result.stopped_early,
    }


def _block_names(module: Any) -> list[str]:
    """Names of the repeated blocks (the first ModuleList with several entries), whose outputs
    healing matches besides the final output."""
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
            return [f"{name}.{index}" for index in range(len(child))]
    return []


def _build_variants(
    key: str,
    label: str,
    model: LoadedModel,
    *,
    plan_size: int,
    target: Target,
    work: Path,
    evaluation: list[dict[str, Any]],
    check_feeds: dict[str, np.ndarray],
    calibration_feeds: list[dict[str, np.ndarray]] | None,
    progress: ProgressFn,
) -> list[Variant]:
    """Export one model and derive its deployable variants: fp32 (optimised), then fp16 or
    int8/int4 as the target asks. The dense model goes through exactly the same steps."""
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.reproducibility import normalize_for_reproducibility

    progress(f"exporting {label} to ONNX (opset {target.opset})")
    raw = export_onnx(model, work / f"{key}.raw.onnx", opset=target.opset)
    # Drops exporter stack traces (absolute paths of this machine) so builds are reproducible.
    normalize_for_reproducibility(raw)
    progress(f"validating {label} ONNX against PyTorch")
    checks = _validate(raw, model, _validation_batches(model, evaluation))
    fp32 = work / f"{key}.fp32.onnx"
    if target.fusion and model.attention_shape is not None:
        from lrt_deploy.export.fusion import fuse_transformer

        heads, hidden = model.attention_shape
        progress(f"fusing {label} attention/GELU/LayerNorm, then ORT {target.optimization_level}")
        optimization = fuse_transformer(
            raw, fp32, num_heads=heads, hidden_size=hidden, level=target.optimization_level,
            check_inputs=check_feeds,
        ).to_dict()
    else:
        from lrt_deploy.export.optimize import optimize_graph

        progress(f"optimising {label} graph ({target.optimization_level})")
        optimization = optimize_graph(raw, fp32, target.optimization_level).to_dict()
    fp32 = _maybe_fix_shapes(fp32, target)
    params = _count_params(model.module)
    variants = [Variant(
        key=f"{key}-fp32", label=f"{label} fp32", onnx_path=fp32,
        is_baseline=key == "dense" or plan_size == 1, validation=checks,
        optimization=optimization, params=params,
    )]
    derived: tuple[str, Path, dict[str, Any]] | None = None
    if target.float16:
        from lrt_deploy.export.float16 import convert_float16

        progress(f"converting {label} to fp16 (LayerNorm/Softmax kept fp32)")
        path = work / f"{key}.fp16.onnx"
        derived = ("fp16", path, convert_float16(fp32, path).to_dict())
    elif target.weight_bits == 4:
        from lrt_deploy.export.quantize import quantize_weights_4bit

        progress(f"quantising {label} MatMul weights to 4 bits (MatMulNBits, block 32)")
        path = work / f"{key}.int4.onnx"
        derived = ("int4", path, quantize_weights_4bit(fp32, path, block_size=32).to_dict())
    elif target.quantize and target.quant_format == "qdq":
        from lrt_deploy.export.quantize import quantize_static_int8

        progress(f"quantising {label} to static int8 QDQ (calibrated)")
        path = work / f"{key}.int8.onnx"
        excluded: list[str] = []
        if target.exclude_sensitive:
            from lrt_deploy.export.quantize import find_sensitive_nodes

            ranked = find_sensitive_nodes(fp32, calibration_feeds or [])
            excluded = [entry.node for entry in ranked[: target.exclude_sensitive]]
            progress(f"keeping the {len(excluded)} most int8-sensitive MatMuls of {label} fp32")
        derived = ("int8", path, quantize_static_int8(
            fp32, path, calibration_feeds or [], per_channel=target.per_channel,
            nodes_to_exclude=excluded,
        ).to_dict())
    elif target.quantize:
        from lrt_deploy.export.quantize import quantize_int8

        progress(f"quantising {label} to int8 (per_channel={target.per_channel})")
        path = work / f"{key}.int8.onnx"
        derived = ("int8", path, quantize_int8(fp32, path, per_channel=target.per_channel)
                   .to_dict())
    if derived is not None:
        suffix, path, details = derived
        variants.append(Variant(
            key=f"{key}-{suffix}", label=f"{label} {suffix}", onnx_path=path,
            optimization=optimization, quantization=details, params=params,
        ))
    return variants


def _validate(path: Path, model: LoadedModel, batches: list[dict]) -> list[dict[str, Any]]:
    from lrt_deploy.export.validate import validate_onnx

    return [c.to_dict() for c in validate_onnx(path, model.forward, batches)]


def _maybe_fix_shapes(path: Path, target: Target) -> Path:
    if not target.fixed_shape:
        return path
    from lrt_deploy.export.mobile import fix_input_shapes

    fixed = path.with_name(path.name.replace(".onnx", ".fixed.onnx"))
    fix_input_shapes(path, fixed, dict(target.fixed_shape))
    return fixed


def _measure(
    variant: Variant,
    loaded: LoadedModel,
    evaluation: list[dict[str, Any]],
    reference: list[np.ndarray],
    masks: list[np.ndarray | None],
    feeds: dict[str, np.ndarray],
    target: Target,
    settings: BenchmarkSettings,
) -> None:
    """Fidelity against the dense PyTorch outputs, latency, size: one variant, one session."""
    from lrt_deploy.runtime import Session, measure_latency

    session = Session(variant.onnx_path, providers=list(target.providers), threads=settings.threads)
    variant.provider = session.provider_report()
    primary = loaded.output_names[0]
    outputs = [
        session.run({n: t.numpy() for n, t in batch.items()}, [primary])[primary]
        for batch in evaluation
    ]
    variant.fidelity = _fidelity(loaded, reference, outputs, masks)
    stats = measure_latency(session, feeds, warmup=settings.warmup, runs=settings.runs)
    variant.latency = stats.to_dict()
    variant.file_bytes = model_bytes(variant.onnx_path)


def _write_bundle(
    staging: Path,
    loaded: LoadedModel,
    target: Target,
    variants: list[Variant],
    deployed: Variant,
    settings: BenchmarkSettings,
    feeds: dict[str, np.ndarray],
    lowrank: dict[str, Any] | None,
) -> dict[str, Any]:
    import onnx

    from lrt_deploy.export.external_data import load_model_proto, save_model_proto

    files: dict[str, str] = {"onnx": "model.onnx"}
    model = load_model_proto(deployed.onnx_path)
    # Weights above the 2 GB protobuf limit go to model.onnx.data beside the graph.
    if save_model_proto(model, staging / "model.onnx").external:
        files["onnx_data"] = "model.onnx.data"
    mobile: dict[str, Any] = {}
    if target.ort_format:
        from lrt_deploy.export.mobile import (
            check_mobile_usability,
            to_ort_format,
            write_required_operators,
        )

        to_ort_format(staging / "model.onnx", staging / "model.ort")
        files["ort"] = "model.ort"
        files["required_operators"] = "required_operators.config"
        mobile["required_operators"] = write_required_operators(
            staging / "model.ort", staging / "required_operators.config"
        )
        _check_ort_runs(staging / "model.ort", deployed, feeds, settings.threads)
        mobile["ort_bytes"] = (staging / "model.ort").stat().st_size
    if target.check_mobile_usability:
        mobile["usability"] = check_mobile_usability(staging / "model.onnx").to_dict()
    files["model"] = files.get("ort", "model.onnx")
    if loaded.tokenizer_file is not None:
        shutil.copyfile(loaded.tokenizer_file, staging / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    files["report"] = "report.json"

    def tensor_info(values: Iterable[Any]) -> list[dict[str, Any]]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
            out.append({
                "name": value.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": shape,
            })
        return out

    from lrt_deploy.runtime.bundle import file_sha256

    # The runtime checks these before opening the bundle (tampered or damaged files).
    checksums = {
        name: file_sha256(staging / name) for key, name in files.items() if key != "report"
    }
    manifest: dict[str, Any] = {
        "format_version": 1,
        "tool": {"name": "lrt-deploy", "version": TOOL_VERSION},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "name": loaded.name,
            "format": loaded.format,
            "sha256": loaded.source_hash,
            "kind": loaded.kind,
        },
        "target": {
            **target.to_dict(),
            "provider_hints": [
                {"provider": name, "options": options}
                for name, options in target.provider_hints()
            ],
        },
        "files": files,
        "checksums": checksums,
        "inputs": tensor_info(model.graph.input),
        "outputs": tensor_info(model.graph.output),
        "text": loaded.text_limits,
        "opset": default_opset(model),
        "variant": deployed.label,
        "quantization": deployed.quantization,
        "optimization": deployed.optimization,
        "lowrank": lowrank,
        "fidelity": deployed.fidelity,
        "validation": deployed.validation or variants[0].validation,
        "sizes": {
            "model_onnx_bytes": model_bytes(staging / "model.onnx"),
            **({"model_ort_bytes": mobile["ort_bytes"]} if "ort_bytes" in mobile else {}),
            "dense_fp32_onnx_bytes": variants[0].file_bytes,
        },
        "params": {"deployed": deployed.params, "dense": variants[0].params},
        "mobile": mobile or None,
        "benchmark": settings.to_dict(),
        "reproducibility": {
            "onnx": "byte-identical for the same model, options and package versions: the "
            "exporter's stack traces (local paths) are stripped",
            **({"ort": "ONNX Runtime's ORT-format writer lays out its kernel tables from an "
                "unordered map, so model.ort bytes can differ between conversions of the same "
                "model.onnx while the graph and kernels are identical"}
               if target.ort_format else {}),
        },
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_ort_runs(
    ort_path: Path, deployed: Variant, feeds: dict[str, np.ndarray], threads: int
) -> None:
    """The .ort file must load and agree with the .onnx it came from."""
    from lrt_deploy.runtime import Session

    ort_out = Session(ort_path, threads=threads).run(feeds)
    onnx_out = Session(deployed.onnx_path, threads=threads).run(feeds)
    for name, value in onnx_out.items():
        diff = float(np.abs(ort_out[name] - value).max(initial=0.0))
        if diff > 1e-4:
            raise LrtDeployError(
                f"model.ort output '{name}' differs from model.onnx by {diff:.3g}; report this "
                "as a bug with the model"
            )


def _lowrank_section(
    factorization: FactorizationResult | None, compression: dict[str, Any],
    design_layers: list[dict[str, Any]],
) -> dict[str, Any] | None:
    if factorization is not None:
        return {
            "origin": "post-training factorization",
            "config": compression["config"],
            "layers": [d.to_dict() for d in factorization.layers],
            "params_before": factorization.params_before,
            "params_after": factorization.params_after,
            "budget_search": compression.get("budget_search"),
            "healing": compression.get("healing"),
        }
    if design_layers:
        return {"origin": "by design", "layers": design_layers}
    return None
