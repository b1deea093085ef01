"""A checked, provider-honest wrapper around ``onnxruntime.InferenceSession``.

Every feed is checked against the graph's inputs before running, so a wrong shape or dtype is
one :class:`InputError` line saying how to fix it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lrt_deploy.errors import BundleError, LrtDeployError

from .bundle import checked_file, read_manifest
from .bundle import session_config as session_config_of
from .devices import DEVICE_CLASSES, host_class
from .limits import check_memory, check_threads, run_bytes
from .providers import (
    CPU_PROVIDER,
    ProviderResolution,
    fallback_message,
    providers_for_target,
    resolve_providers,
)

__all__ = ["InputError", "Session", "TensorSpec"]

logger = logging.getLogger(__name__)

# BERT-style models declare token_type_ids but almost every caller means "all segment 0".
_ZERO_FILLED_INPUT = "token_type_ids"
_ZERO_FILL_TEMPLATE = "input_ids"

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}

_ITEMSIZE_OF = {name: np.dtype(name).itemsize for name in set(_ORT_TYPES.values())
                 if name not in ("str", "bfloat16")} | {"bfloat16": 2}

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_MODEL_LOAD_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NotImplemented",
                 "InvalidArgument")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)


class InputError(LrtDeployError):
    """Raised when feeds do not match the model's inputs; the message says how to fix them."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: numpy dtype name, and per axis a fixed size, a symbolic name
    (``"batch"``) or None."""

    name: str
    dtype: str
    shape: list[int | str | None]

    def to_dict(self) -> dict[str, Any]:
        """The spec as a manifest ``inputs``/``outputs`` entry."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _spec_from_node(node: Any) -> TensorSpec:
    shape = [dim if isinstance(dim, int | str) else None for dim in (node.shape or [])]
    return TensorSpec(name=node.name, dtype=_ORT_TYPES.get(node.type, node.type), shape=shape)


def _format_shape(shape: Sequence[int | str | None]) -> str:
    entries = ["?" if dim is None else str(dim) for dim in shape]
    return f"({entries[0]},)" if len(entries) == 1 else f"({', '.join(entries)})"


def _resolve_model_path(path: Path, verify: bool) -> tuple[Path, dict[str, Any] | None]:
    """The model file to open and the bundle manifest (None for a bare model file)."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise BundleError(f"'{path}' does not exist: pass a bundle folder or a .onnx/.ort file")
    manifest = read_manifest(path)
    model_path = checked_file(path, manifest, "model", "onnx", verify=verify)
    if model_path is None:
        raise BundleError(f"manifest of '{path}' names no model under files.model: re-export it")
    return model_path, manifest


def _full_range_int8(manifest: dict[str, Any]) -> bool:
    """True for an integer-kernel int8 recipe with full-range weights."""
    precision = ((manifest.get("target") or {}).get("precision")) or {}
    return (isinstance(precision, dict)
            and precision.get("kind") in ("dynamic-int8", "static-int8")
            and precision.get("weight_grid", "full-range") == "full-range")


def _cast(name: str, array: np.ndarray, expected: str) -> np.ndarray:
    """Cast ``array`` to the model's dtype when that is safe, else raise :class:`InputError`."""
    if array.dtype.kind in "biufc" and not array.dtype.isnative:
        # onnxruntime reads raw bytes as native order: a big-endian array would be misread.
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind == "O":
        raise InputError(
            f"input {name!r} is an array of Python objects: pass a numeric numpy array"
        )
    if array.dtype.name == expected or expected in ("str", "bfloat16"):
        return array
    target = np.dtype(expected)
    lossless_int = (
        array.dtype.kind in "iu" and target.kind == "i" and np.can_cast(array.dtype, target)
    )
    # float64 -> float32 is lossy in general, but it is what every numpy caller means.
    float_to_float32 = array.dtype.kind == "f" and target == np.float32
    if lossless_int or float_to_float32:
        return array.astype(target)
    raise InputError(
        f"input {name!r} has dtype {array.dtype.name} but the model expects {expected}; "
        f"convert it explicitly, e.g. {name}.astype(np.{expected})"
    )


class Session:
    """Run a bundle folder or ``.onnx``/``.ort`` file with checked inputs and an honest
    provider report.

    Providers, first match wins: ``providers``, ``target``, the manifest's
    ``target.providers``, CPU; missing ones are dropped with a WARNING. Feeds must match the
    graph's names, ranks and fixed or shared named dimensions; dtypes convert only when
    lossless (integers) or conventional (floats to float32); an omitted ``token_type_ids`` is
    zeros shaped like ``input_ids``.

    Args:
        threads: Intra-op threads (inter-op then 1), at most
            :func:`lrt_deploy.runtime.limits.thread_limit`; None keeps onnxruntime's default.
        optimization_level: ``"disable"``, ``"basic"``, ``"extended"``, ``"all"`` or an
            ``onnxruntime.GraphOptimizationLevel``; None keeps onnxruntime's default.
        verify: Check the bundle's files against its manifest's SHA-256 checksums first.
        session_config: Session config entries applied after the manifest's
            ``devices.session_config``.

    Example:
        >>> session = Session("out/minilm", threads=4)  # doctest: +SKIP
        >>> outputs = session.run({"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        target: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        optimization_level: str | ort.GraphOptimizationLevel | None = None,
        verify: bool = True,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        # Bounded before anything is read: a thread count past the machine's limits segfaults
        # or hangs inside onnxruntime.
        check_threads(threads)
        self.model_path, self._manifest = _resolve_model_path(Path(path), verify)
        requested = self._requested_providers(target, providers)
        self._resolution: ProviderResolution = resolve_providers(requested)

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if optimization_level is not None:
            options.graph_optimization_level = self._optimization_level(optimization_level)
        # The bundle's entries first (its int8 recipe may rely on one), then the caller's.
        for key, value in {**session_config_of(self._manifest), **(session_config or {})}.items():
            options.add_session_config_entry(key, value)

        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=self._resolution.used
            )
        except _MODEL_LOAD_ERRORS as exc:
            # A damaged, truncated or foreign file (or one whose external data points outside
            # its folder, which onnxruntime refuses): one error type, one line.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(
                f"cannot open model '{self.model_path.name}': {reason[:300]}; re-export or "
                "re-download it"
            ) from None
        self.active_providers: list[str] = list(self._session.get_providers())
        self._inputs = [_spec_from_node(node) for node in self._session.get_inputs()]
        self._outputs = [_spec_from_node(node) for node in self._session.get_outputs()]
        self._check_active_providers()
        self.device_class: str | None = host_class()
        self._check_device_class()
        logger.info("opened %s on %s", self.model_path, ", ".join(self.active_providers))

    def _requested_providers(
        self, target: str | None, providers: Sequence[str] | None
    ) -> list[str]:
        if providers is not None:
            return [providers] if isinstance(providers, str) else list(providers)
        if target is not None:
            return providers_for_target(target)
        manifest_target = (self._manifest or {}).get("target") or {}
        if manifest_target.get("providers"):
            return list(manifest_target["providers"])
        return [CPU_PROVIDER]

    @staticmethod
    def _optimization_level(
        level: str | ort.GraphOptimizationLevel,
    ) -> ort.GraphOptimizationLevel:
        if isinstance(level, ort.GraphOptimizationLevel):
            return level
        try:
            return _OPTIMIZATION_LEVELS[level.lower()]
        except KeyError:
            choices = ", ".join(_OPTIMIZATION_LEVELS)
            raise ValueError(
                f"unknown optimization_level {level!r}; use one of {choices}"
            ) from None

    def _check_active_providers(self) -> None:
        """Record providers that are compiled in but failed to start (e.g. no CUDA driver)."""
        failed = [p for p in self._resolution.used if p not in self.active_providers]
        if not failed:
            return
        resolution = self._resolution
        missing = resolution.missing + failed
        message = fallback_message(missing, resolution.available, self.active_providers)
        message += f" ({', '.join(failed)} failed to initialise)"
        logger.warning(message)
        self._resolution = ProviderResolution(
            requested=resolution.requested,
            available=resolution.available,
            used=resolution.used,
            missing=missing,
            fell_back=True,
            message=message,
        )

    def device_report(self) -> dict[str, Any]:
        """This machine's device ``class``, whether the bundle is ``exact`` there (None when
        unrecorded), its ``verified`` row for the class and a warning ``message`` (or None)."""
        devices = (self._manifest or {}).get("devices") or {}
        exact_on = devices.get("exact_on")
        name = self.device_class
        exact = None if not isinstance(exact_on, list) or name is None else name in exact_on
        rows = (devices.get("verification") or {}).get("classes") or []
        verified = next((r for r in rows if isinstance(r, dict) and r.get("name") == name
                         and r.get("verified")), None)
        message = None
        if self._manifest is not None and name is not None:
            if exact is False:
                message = (f"this CPU is {name} ({DEVICE_CLASSES[name].title}), where the "
                           "bundle's int8 kernels are not exact: its outputs differ from its "
                           "report; re-export it with lrt-export --int8-weights pair-safe")
            elif exact is None and DEVICE_CLASSES[name].saturates_u8s8 and _full_range_int8(
                    self._manifest):
                message = (f"this CPU is {name} ({DEVICE_CLASSES[name].title}) and the bundle "
                           "predates pair-safe int8 weights: onnxruntime's int8 kernel "
                           "saturates here; re-export it with this lrt-deploy")
        return {"class": name, "exact": exact, "verified": verified, "message": message}

    def _check_device_class(self) -> None:
        message = self.device_report()["message"]
        if message:
            logger.warning(message)

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The bundle's ``manifest.json`` as a dict, or None when opened from a model file."""
        return self._manifest

    @property
    def inputs(self) -> list[TensorSpec]:
        """The graph inputs as declared in the model."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        """The graph outputs as declared in the model."""
        return list(self._outputs)

    @property
    def input_names(self) -> list[str]:
        """Names of the graph inputs, in graph order."""
        return [spec.name for spec in self._inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in graph order."""
        return [spec.name for spec in self._outputs]

    @property
    def inference_session(self) -> ort.InferenceSession:
        """The underlying ``onnxruntime.InferenceSession`` (no input checks when used directly)."""
        return self._session

    def provider_report(self) -> dict[str, Any]:
        """Providers ``requested``, ``available``, ``active`` and ``missing``, whether the
        session ``fell_back``, and a one-line ``message``."""
        resolution = self._resolution
        return {
            "requested": list(resolution.requested),
            "available": list(resolution.available),
            "active": list(self.active_providers),
            "missing": list(resolution.missing),
            "fell_back": resolution.fell_back,
            "message": resolution.message,
        }

    def prepare(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Feeds checked and converted for ``InferenceSession.run``, every input present;
        :class:`InputError` on any mismatch."""
        specs = {spec.name: spec for spec in self._inputs}
        unexpected = [name for name in feeds if name not in specs]
        if unexpected:
            raise InputError(
                f"unexpected input(s) {', '.join(map(repr, unexpected))}; "
                f"remove them, the model takes only: {', '.join(specs)}"
            )
        arrays = {
            name: _cast(name, np.asarray(value), specs[name].dtype) for name, value in feeds.items()
        }
        if (
            _ZERO_FILLED_INPUT in specs
            and _ZERO_FILLED_INPUT not in arrays
            and _ZERO_FILL_TEMPLATE in arrays
        ):
            arrays[_ZERO_FILLED_INPUT] = np.zeros(
                arrays[_ZERO_FILL_TEMPLATE].shape, dtype=specs[_ZERO_FILLED_INPUT].dtype
            )
        missing = [name for name in specs if name not in arrays]
        if missing:
            raise InputError(
                f"missing input(s) {', '.join(map(repr, missing))}; "
                f"pass every input the model takes: {', '.join(specs)}"
            )
        named_dims: dict[str, tuple[int, str]] = {}
        for spec in self._inputs:
            self._check_shape(spec, arrays[spec.name].shape, named_dims)
        self._check_text_limits(arrays)
        self._check_output_memory(named_dims)
        return {spec.name: arrays[spec.name] for spec in self._inputs}

    def check_run_size(self, batch: int, sequence: int, *, extra_bytes: int = 0,
                       fix: str = "run smaller batches or shorter sequences") -> None:
        """Refuse a run at ``batch`` x ``sequence`` whose feeds and outputs alone (plus
        ``extra_bytes``) exceed the memory left (``ResourceLimitError`` saying ``fix``)."""
        tensors = [(spec.shape, spec.dtype) for spec in [*self._inputs, *self._outputs]]
        check_memory(run_bytes(tensors, batch, sequence) + extra_bytes,
                     f"a run of batch {batch} x sequence {sequence}", fix)

    def _check_output_memory(self, named_dims: dict[str, tuple[int, str]]) -> None:
        """Refuse outputs that cannot fit in memory: onnxruntime aborts the process on some
        failed allocations."""
        sizes = {name: size for name, (size, _) in named_dims.items()}
        needed = 0
        for spec in self._outputs:
            size = _ITEMSIZE_OF.get(spec.dtype, 1)
            for dim in spec.shape:
                size *= dim if isinstance(dim, int) and dim > 0 else sizes.get(dim, 1)
            needed += size
        if needed > 2**28:  # reading /proc only for large runs
            check_memory(needed, "the outputs of this run",
                         "run smaller batches or shorter sequences")

    def _check_text_limits(self, arrays: dict[str, np.ndarray]) -> None:
        """Refuse token ids outside the vocabulary and sequences longer than the model's
        positions, where the manifest states them."""
        limits = (self._manifest or {}).get("text") or {}
        vocab, max_sequence = limits.get("vocab_size"), limits.get("max_sequence")
        ids = arrays.get("input_ids")
        if ids is not None and vocab and ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise InputError(
                    f"input 'input_ids' holds token id {bad}, outside the model's vocabulary "
                    f"[0, {vocab - 1}]: tokenize with the bundle's tokenizer.json"
                )
        if max_sequence:
            for name in ("input_ids", "attention_mask", "token_type_ids"):
                array = arrays.get(name)
                if array is not None and array.ndim >= 2 and array.shape[1] > max_sequence:
                    raise InputError(
                        f"input {name!r} has {array.shape[1]} tokens but the model supports at "
                        f"most {max_sequence}: truncate (TextEncoder(max_length="
                        f"{max_sequence}) does)"
                    )

    @staticmethod
    def _check_shape(
        spec: TensorSpec, shape: tuple[int, ...], named_dims: dict[str, tuple[int, str]]
    ) -> None:
        if len(shape) != len(spec.shape):
            raise InputError(
                f"input {spec.name!r} has rank {len(shape)} (shape {_format_shape(shape)}) but "
                f"the model expects rank {len(spec.shape)} {_format_shape(spec.shape)}; "
                "add or remove axes (e.g. x[None] adds a batch axis)"
            )
        wrong = [
            (size, dim)
            for size, dim in zip(shape, spec.shape, strict=True)
            if isinstance(dim, int) and size != dim
        ]
        if wrong:
            fixed = wrong[0][1] if len(wrong) == 1 else _format_shape([dim for _, dim in wrong])
            raise InputError(
                f"input {spec.name!r} has shape {_format_shape(shape)} but the model was exported "
                f"with fixed shape {_format_shape(spec.shape)}: pad/truncate to {fixed} or "
                "re-export without --fixed-shape"
            )
        for size, dim in zip(shape, spec.shape, strict=True):
            if not isinstance(dim, str):
                continue
            if dim not in named_dims:
                named_dims[dim] = (size, spec.name)
                continue
            seen_size, seen_input = named_dims[dim]
            if size != seen_size:
                raise InputError(
                    f"input {spec.name!r} has {dim}={size} but input {seen_input!r} has "
                    f"{dim}={seen_size}; inputs sharing the dimension {dim!r} must agree"
                )

    def run(
        self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Check the feeds, run the model and return ``output_names`` (default all) by name."""
        if isinstance(output_names, str):
            output_names = [output_names]
        names = list(output_names) if output_names is not None else self.output_names
        unknown = [name for name in names if name not in self.output_names]
        if unknown:
            raise ValueError(
                f"unknown output(s) {', '.join(map(repr, unknown))}; "
                f"the model produces: {', '.join(self.output_names)}"
            )
        values = self._session.run(names, self.prepare(feeds))
        return dict(zip(names, values, strict=True))

    def __repr__(self) -> str:
        return (
            f"Session({str(self.model_path)!r}, active_providers={self.active_providers}, "
            f"inputs={self.input_names}, outputs={self.output_names})"
        )
