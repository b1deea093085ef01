"""``lrt-export``: argument parsing only; every step is a library function."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lrt_deploy.cli.base import EXIT_FLOOR_MISSED, EXIT_USAGE, Parser
from lrt_deploy.errors import LrtDeployError

if TYPE_CHECKING:
    from lrt_deploy.config import HealConfig, LowRankConfig
    from lrt_deploy.export.targets import Target
    from lrt_deploy.quant.recipes import Precision

__all__ = ["EXIT_FLOOR_MISSED", "EXIT_USAGE", "FLAGS", "FidelityFloorMissed", "build_parser",
           "in_flags", "main"]


class FidelityFloorMissed(LrtDeployError):
    """``--strict`` and the fidelity floor was missed on held-out text (the bundle is written,
    so it can be inspected; the exit code lets CI gate on it)."""

    exit_code = EXIT_FLOOR_MISSED


def _rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a rank: give an integer (64) or a fraction of the full rank (0.5)"
        ) from None


def _fixed_shape(text: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not name or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a fixed shape: write NAME=SIZE[,NAME=SIZE], e.g. "
                "batch=1,sequence=128"
            )
        if name in sizes:
            raise argparse.ArgumentTypeError(
                f"'{text}' gives {name} twice ({sizes[name]} and {value}): give each dimension "
                "once"
            )
        sizes[name] = int(value)
    return sizes


class _MergeFixedShape(argparse.Action):
    """``--fixed-shape`` given several times: the sizes are merged, and a dimension given twice
    is refused instead of the last one silently winning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        merged = dict(getattr(namespace, self.dest) or {})
        for name, size in values.items():
            if name in merged:
                parser.error(f"argument {option_string}: {name} is given twice ({merged[name]} "
                             f"and {size}): give each dimension once")
            merged[name] = size
        setattr(namespace, self.dest, merged)


def build_parser() -> argparse.ArgumentParser:
    """lrt-export's command line."""
    parser = Parser(
        prog="lrt-export",
        description=(
            "Export a (low-rank) transformer to an ONNX Runtime deployment bundle and compare it "
            "with the dense model, measured in the same run."
        ),
    )
    parser.add_argument(
        "path",
        help="model: TorchScript .pt, torch.save'd module .pt (with --trust-pickle), state-dict "
        ".pt (with --factory), torch.export .pt2, a Hugging Face folder, or all-MiniLM-L6-v2",
    )
    parser.add_argument("--target", choices=("cpu", "cuda", "mobile"), default="cpu",
                        help="deployment preset (default: cpu)")
    parser.add_argument("-o", "--output", type=Path,
                        help="bundle folder (default: out/<model>-<target>)")
    parser.add_argument("--force", action="store_true", help="replace the output folder")
    _add_loading(parser.add_argument_group("loading"))
    _add_compression(parser.add_argument_group("compression"))
    _add_export(parser.add_argument_group("export"))
    bench = parser.add_argument_group("measurement")
    bench.add_argument("--batch", type=int, default=1, help="latency batch size (default 1)")
    bench.add_argument("--sequence", type=int, default=128,
                       help="latency sequence length (default 128)")
    bench.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    bench.add_argument("--runs", type=int, default=30, help="timed runs per variant (default 30)")

    parser.add_argument("-q", "--quiet", action="store_true", help="print only the result table")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    return parser


def _add_loading(load: argparse._ArgumentGroup) -> None:
    load.add_argument("--trust-pickle", action="store_true",
                      help="allow unpickling a full nn.Module (this runs code from the file)")
    load.add_argument("--factory", metavar="MODULE:FUNCTION",
                      help="builds the architecture for a state-dict .pt")
    load.add_argument("--input-shape", action="append", default=[], metavar="NAME=D,D[:DTYPE]",
                      help="example input for models without example_inputs(); repeat per input")
    load.add_argument("--max-length", type=int, default=128,
                      help="token limit for text models (default 128)")


def _add_compression(comp: argparse._ArgumentGroup) -> None:
    comp.add_argument("--rank", type=_rank,
                      help="factorize Linear layers to this rank (int) or fraction of full rank")
    comp.add_argument("--budget", type=float, metavar="FRACTION",
                      help="keep this fraction of the candidate layers' parameters, ranks "
                      "allocated across layers by measured sensitivity (e.g. 0.7)")
    comp.add_argument("--energy", type=float, metavar="FRACTION",
                      help="per layer, the smallest rank keeping this fraction of the "
                      "(whitened) spectrum energy (e.g. 0.95)")
    comp.add_argument("--fidelity-floor", type=float, metavar="COSINE",
                      help="the smallest global budget whose model keeps this mean cosine to "
                      "the dense model on a calibration split (e.g. 0.99); slower: it "
                      "factorizes several times")
    comp.add_argument("--heal", type=int, default=0, metavar="STEPS",
                      help="after factorizing, distil towards the dense model for STEPS steps "
                      "on the calibration data (keeps the best; never worse)")
    comp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where --heal trains: auto (a CUDA GPU when PyTorch sees one, "
                      "default), cpu or cuda (an error without a GPU)")
    comp.add_argument("--heal-precision", choices=("auto", "fp32", "bf16", "fp16"),
                      default="auto",
                      help="--heal autocast: auto (bf16/fp16 on a GPU, fp32 on CPU, default)")
    comp.add_argument("--heal-batch", type=int, default=32, metavar="N",
                      help="sentences per --heal step when a --calibration text file is "
                      "streamed (default 32; the GPU runs in the README used 64)")
    comp.add_argument("--heal-lr", type=float, default=1e-4, metavar="LR",
                      help="peak learning rate of --heal (default 1e-4)")
    comp.add_argument("--heal-quantized", action="store_true",
                      help="heal with the target's quantisation (--quantize int8 or int4) "
                      "simulated in the loop, exactly as ONNX Runtime rounds; every weight but "
                      "the embedding tables trains. Without a factorization it heals the "
                      "dense model for its int8/int4 form. Use --heal-precision fp32 on a GPU")
    comp.add_argument("--strict", action="store_true",
                      help="with --fidelity-floor: exit with code 3 when a held-out figure "
                      "(heldout.txt or heldout_domain.txt, on any device class that ran) is "
                      "below the floor; the bundle is still written")
    comp.add_argument("--solver", choices=("asvd", "svd"), default="asvd",
                      help="asvd: activation-aware (calibrated) SVD (default); svd: plain SVD")
    comp.add_argument("--calibration", metavar="FILE",
                      help="text lines (.txt) or named inputs (.npz); default: shipped corpus. "
                      "With --heal a text file is streamed (any size; its first 2048 lines "
                      "calibrate the factorization) unless --heal-corpus is given")
    comp.add_argument("--heal-corpus", metavar="FILE",
                      help="with --heal: stream this text file (any size) to heal on, while "
                      "--calibration (default: the shipped corpus) calibrates the "
                      "factorization, the budget search and int8")
    comp.add_argument("--factorize-embeddings", action="store_true",
                      help="also factorize Embedding tables")
    comp.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                      help="keep layers matching this name pattern dense (repeatable)")


def _add_export(exp: argparse._ArgumentGroup) -> None:
    exp.add_argument("--quantize", choices=("int8", "int4", "none"), default="none",
                     help="int8: per-channel int8 weights (default: none); int4: 4-bit "
                     "weight-only MatMulNBits")
    exp.add_argument("--int4-block", type=int, default=32, metavar="N",
                     help="with --quantize int4: weights per scale, a power of two >= 16 "
                     "(32 default; 64 is ~10%% smaller)")
    exp.add_argument("--quant-format", choices=("dynamic", "qdq", "weight-only"),
                     default=None,
                     help="int8 as dynamic quantisation (default), static QDQ calibrated on "
                     "the calibration data, or weight-only (activations float: the same "
                     "embeddings in every ONNX Runtime build, WebAssembly included)")
    exp.add_argument("--exclude-sensitive", type=int, default=0, metavar="N",
                     help="with --quantize int8: keep the N MatMuls int8 hurts most in fp32 "
                     "(dynamic: measured on the model output, one MatMul at a time; qdq: each "
                     "MatMul's own SQNR)")
    exp.add_argument("--no-smoothing", action="store_true",
                     help="dynamic int8: skip outlier smoothing (by default input channels "
                     "peaking above 8x the median channel on the calibration data are scaled "
                     "into the weights, one Mul per such input; --heal-quantized simulates either)")
    exp.add_argument("--int8-weights", choices=("pair-safe", "full-range"), default=None,
                     help="int8 (dynamic or qdq) weight grid: pair-safe (default) is exact on "
                     "every CPU; full-range [-127, 127] computes wrongly on x86 AVX2 without "
                     "VNNI (AMD Zen 1-3, Intel before Ice Lake), and the manifest says so")
    exp.add_argument("--no-verify-devices", action="store_true",
                     help="skip running the deployed text model on the other device classes "
                     "(x86 AVX2/SSE and ARM64 under qemu, WebAssembly in Node; ~1 min); the "
                     "classes its int8 kernels are exact on are still recorded")
    exp.add_argument("--per-tensor", action="store_true",
                     help="one int8 scale per weight tensor instead of per channel")
    exp.add_argument("--no-fusion", action="store_true",
                     help="skip lrt-deploy's attention/GELU fusion (ORT's own passes still run)")
    exp.add_argument("--no-float16", action="store_true",
                     help="cuda: keep fp32 weights instead of fp16")
    exp.add_argument("--tensorrt", action="store_true",
                     help="cuda: list TensorRT before CUDA in the provider hints")
    exp.add_argument("--fixed-shape", type=_fixed_shape, action=_MergeFixedShape,
                     metavar="NAME=SIZE,...",
                     help="fix symbolic dimensions, e.g. batch=1,sequence=128 (NNAPI/CoreML)")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    exp.add_argument("--optimization", choices=("basic", "extended"), default="extended",
                     help="offline ORT graph optimisation level (default extended)")


def _run(args: argparse.Namespace) -> int:
    from lrt_deploy.load import load_model, parse_input_spec
    from lrt_deploy.pipeline import export_bundle
    from lrt_deploy.plan import BenchmarkSettings, check_choices
    from lrt_deploy.report import to_markdown

    _check_ranges(args)
    started = time.perf_counter()

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    target = _target(args)
    compress, heal = _compress(args), _heal(args)
    settings = BenchmarkSettings(
        batch=args.batch, sequence=args.sequence, threads=args.threads, runs=args.runs
    )
    check_choices(target, compress, heal)
    if heal is not None:
        from lrt_deploy.compress.heal import select_device

        select_device(heal.device)  # no GPU: one line now, before loading anything
    specs = [parse_input_spec(text) for text in args.input_shape]

    progress(f"loading {args.path}")
    loaded = load_model(args.path, trust_pickle=args.trust_pickle, factory=args.factory,
                        input_specs=specs, max_length=args.max_length)
    output = args.output or Path("out") / f"{loaded.name}-{target.name}"
    result = export_bundle(
        loaded, output, target, compress=compress, heal=heal, calibration=args.calibration,
        settings=settings, force=args.force, progress=progress,
        verify_on_devices=not args.no_verify_devices,
    )
    print(to_markdown(result.report))
    progress(f"bundle written to {result.out_dir}")
    _judge_devices(result.devices, args, result.out_dir)
    verdict = result.compression.floor_verdict if result.compression is not None else None
    if verdict is not None and not verdict.met:
        if args.quiet:  # progress showed them otherwise; a miss is never silent
            print(verdict.lines()[-1], file=sys.stderr)
        if args.strict:
            raise FidelityFloorMissed(
                f"fidelity floor {verdict.floor:g} missed on {', '.join(verdict.missed_on)} "
                f"(bundle written to {result.out_dir}): raise --fidelity-floor, heal, or "
                "drop --strict"
            )
    return 0


def _target(args: argparse.Namespace) -> Target:
    """The preset ``--target`` names, with the export flags' overrides."""
    from lrt_deploy.export.targets import Target

    overrides: dict[str, object] = {
        "opset": args.opset,
        "optimization_level": args.optimization,
        "fixed_shape": args.fixed_shape or {},
    }
    precision = _precision(args)
    if precision is not None or args.no_float16:
        # Otherwise the preset's own precision stays (fp16 on cuda).
        overrides["precision"] = precision
    if args.no_fusion:
        overrides["fusion"] = False
    if args.tensorrt:
        overrides["tensorrt"] = True
    return Target.from_name(args.target, **overrides)


def _compress(args: argparse.Namespace) -> LowRankConfig | None:
    """The factorization the compression flags ask for (one policy flag at most), or None."""
    from lrt_deploy.config import BudgetRank, EnergyRank, FidelityFloor, LowRankConfig, UniformRank

    given = [(flag, make, value) for flag, make, value in (
        ("--rank", UniformRank, args.rank), ("--budget", BudgetRank, args.budget),
        ("--energy", EnergyRank, args.energy), ("--fidelity-floor", FidelityFloor,
                                                  args.fidelity_floor),
    ) if value is not None]
    if len(given) > 1:
        raise _usage_error(f"{' and '.join(flag for flag, _, _ in given)} exclude each other: "
                           "choose one")
    if args.strict and args.fidelity_floor is None:
        raise _usage_error("--strict gates on a fidelity floor: add --fidelity-floor COSINE")
    if not given:
        return None
    _, make, value = given[0]
    return LowRankConfig(make(value), solver=args.solver,
                         factorize_embeddings=args.factorize_embeddings, skip=tuple(args.skip))


def _heal(args: argparse.Namespace) -> HealConfig | None:
    """The healing ``--heal`` and its companion flags ask for, or None."""
    from lrt_deploy.config import HealConfig

    if not args.heal:
        if args.heal_quantized:
            raise _usage_error("--heal-quantized needs --heal STEPS")
        if args.heal_corpus is not None:
            raise _usage_error("--heal-corpus is what --heal trains on: add --heal STEPS")
        return None
    return HealConfig(steps=args.heal, device=args.device, precision=args.heal_precision,
                      quantized=args.heal_quantized, batch=args.heal_batch, lr=args.heal_lr,
                      corpus=args.heal_corpus)


def _judge_devices(devices: dict | None, args: argparse.Namespace, out_dir: Path) -> None:
    """Say (stderr) which device classes miss ``--fidelity-floor``; with ``--strict`` fail."""
    verification = (devices or {}).get("verification")
    if not verification or args.fidelity_floor is None:
        return
    from lrt_deploy.verify.check import DeviceVerification

    missed = DeviceVerification.from_dict(verification).failures(args.fidelity_floor)
    if not missed:
        return
    print(f"device classes below the floor: {'; '.join(missed)}", file=sys.stderr)
    if args.strict:
        raise FidelityFloorMissed(
            f"fidelity floor {args.fidelity_floor:g} missed on {'; '.join(missed)} (bundle "
            f"written to {out_dir}): see the report's device table, or drop --strict")


def _precision(args: argparse.Namespace) -> Precision | None:
    """The precision recipe the quantisation flags ask for, or None (fp32, or the preset's)."""
    from lrt_deploy.quant.recipes import (
        DynamicInt8,
        Int4WeightOnly,
        Int8WeightOnly,
        StaticInt8,
    )

    quant_format = args.quant_format or "dynamic"
    _refuse_idle_flags(args)
    static = args.quantize == "int8" and quant_format == "qdq"
    grid = args.int8_weights or "pair-safe"
    if args.quantize == "int4":
        return Int4WeightOnly(block=args.int4_block)
    if args.quantize == "int8" and quant_format == "weight-only":
        return Int8WeightOnly()
    if static:
        return StaticInt8(per_channel=not args.per_tensor, exclude_sensitive=args.exclude_sensitive,
                          weight_grid=grid)
    if args.quantize == "int8":
        return DynamicInt8(per_channel=not args.per_tensor,
                           exclude_sensitive=args.exclude_sensitive,
                           smooth=not args.no_smoothing, weight_grid=grid)
    return None


def _int8_activations(args: argparse.Namespace) -> bool:
    return args.quantize == "int8" and args.quant_format in (None, "dynamic", "qdq")


#: Every quantisation flag: when it is set, whether it applies, and the one line when it does not.
#: A flag set where it changes nothing is refused, never ignored (:func:`_refuse_idle_flags`).
_Check = Callable[[argparse.Namespace], bool]
_QUANT_FLAGS: tuple[tuple[str, _Check, _Check, str], ...] = (
    ("--quant-format", lambda a: a.quant_format is not None,
     lambda a: a.quantize == "int8",
     "--quant-format chooses how int8 is stored and applies only to --quantize int8 (int4 is "
     "always weight-only): add --quantize int8 or drop --quant-format"),
    ("--per-tensor", lambda a: a.per_tensor,
     lambda a: _int8_activations(a),
     "--per-tensor applies to int8 with per-channel scales (--quantize int8, dynamic or "
     "--quant-format qdq): add --quantize int8 or drop --per-tensor"),
    ("--exclude-sensitive", lambda a: bool(a.exclude_sensitive),
     lambda a: _int8_activations(a),
     "--exclude-sensitive applies to int8 with quantised activations: add --quantize int8 "
     "(dynamic, or --quant-format qdq)"),
    ("--no-smoothing", lambda a: a.no_smoothing,
     lambda a: a.quantize == "int8" and a.quant_format in (None, "dynamic"),
     "--no-smoothing applies to dynamic int8: add --quantize int8 or drop it"),
    ("--int8-weights", lambda a: a.int8_weights is not None,
     lambda a: _int8_activations(a),
     "--int8-weights applies to int8 with quantised activations: add --quantize int8 "
     "(dynamic, or --quant-format qdq) or drop it"),
    ("--int4-block", lambda a: a.int4_block != 32,
     lambda a: a.quantize == "int4",
     "--int4-block applies to --quantize int4: add it or drop the block"),
)


def _refuse_idle_flags(args: argparse.Namespace) -> None:
    """Refuse a quantisation flag given where it does nothing (one line, before any loading)."""
    for _flag, given, applies, message in _QUANT_FLAGS:
        if given(args) and not applies(args):
            raise _usage_error(message)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_ranges(args: argparse.Namespace) -> None:
    """Refuse numbers beyond what lrt-export measures, before any model is loaded."""
    cpus = _available_cpus()
    if args.threads > cpus:
        raise _usage_error(
            f"--threads {args.threads} exceeds the {cpus} CPUs available here: more threads "
            f"than cores only distort the latency figures; use at most {cpus}"
        )
    for name, value, most in (("--batch", args.batch, 4096), ("--sequence", args.sequence, 65536),
                              ("--runs", args.runs, 100_000), ("--max-length", args.max_length,
                                                               65536)):
        if value > most:
            raise _usage_error(f"{name} {value} is beyond what lrt-export measures: use at most "
                               f"{most}")
    if args.max_length < 1:
        raise _usage_error(f"--max-length must be at least 1, got {args.max_length}")
    if args.batch * args.sequence > 1 << 20:
        raise _usage_error(
            f"--batch {args.batch} x --sequence {args.sequence} is over 1M tokens per run: "
            "measure smaller batches"
        )
    if (args.fixed_shape or {}).get("batch", 1) > 4096:
        raise _usage_error("--fixed-shape batch must be at most 4096")


#: The Python spellings library errors use for config fields and arguments, and the flags
#: lrt-export users type for them: the one place fields are translated to flags.
FLAGS: dict[str, str] = {
    "heal=HealConfig(...)": "--heal",
    "compress=LowRankConfig(...)": "--rank, --budget, --energy or --fidelity-floor",
    "compress=": "--rank",
    "HealConfig.steps": "--heal",
    "HealConfig.quantized=True": "--heal-quantized",
    "HealConfig.device": "--device",
    "HealConfig.precision": "--heal-precision",
    "HealConfig.batch": "--heal-batch",
    "HealConfig.lr": "--heal-lr",
    "HealConfig.corpus": "--heal-corpus",
    "device='cuda'": "--device cuda",
    "device='auto' or 'cpu'": "--device auto or cpu",
    "device='auto', 'cpu' or 'cuda'": "--device auto, cpu or cuda",
    "UniformRank.rank": "--rank",
    "rank=0.25": "--rank 0.25",
    "BudgetRank.budget": "--budget",
    "EnergyRank.energy": "--energy",
    "FidelityFloor.floor": "--fidelity-floor",
    "LowRankConfig.solver": "--solver",
    "LowRankConfig.skip": "--skip",
    "solver='svd'": "--solver svd",
    "precision=DynamicInt8(per_channel=True)":
        "--quantize int8 (without --per-tensor/--quant-format qdq)",
    "precision=Int4WeightOnly()": "--quantize int4",
    "Target.fixed_shape": "--fixed-shape",
    "BenchmarkSettings.batch": "--batch",
    "BenchmarkSettings.sequence": "--sequence",
    "BenchmarkSettings.threads": "--threads",
    "BenchmarkSettings.runs": "--runs",
    "calibration='inputs.npz'": "--calibration inputs.npz",
    "trust_pickle=True": "--trust-pickle",
    "factory=": "--factory ",
    "input_specs=": "--input-shape ",
    "input_specs": "--input-shape",
    "force=True": "--force",
    "out_dir": "-o",
    "Target.opset=": "--opset ",
    "Target.opset": "--opset",
    "exclude_sensitive=6": "--exclude-sensitive 6",
}
_FIELD = re.compile("|".join(re.escape(k) for k in sorted(FLAGS, key=len, reverse=True)))


def in_flags(message: str) -> str:
    """``message`` with the config fields and arguments it names spelled as lrt-export flags."""
    return _FIELD.sub(lambda match: FLAGS[match.group(0)], message)


def _usage_error(message: str) -> Exception:
    return LrtDeployError(message)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same clean-up runs (staging removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lrt-export``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handled = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _raise_terminated) for s in handled}
    try:
        return _run(args)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"lrt-export: {'interrupted' if signum == signal.SIGINT else 'terminated'}; no "
              "bundle was written", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:
        if not isinstance(exc, LrtDeployError):
            raise
        print(f"lrt-export: error: {in_flags(str(exc))}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
