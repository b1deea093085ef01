"""Sequence-length sweep on exported ONNX: where LRT pays and where Linformer pays.

The thesis behind lrt-deploy found low-rank (LRT) layers best for short inputs (<= 512 tokens)
and Linformer attention best for long ones (>= 512). This script measures that on graphs
exported through lrt-deploy's own path (``export_onnx`` then ``fuse_transformer``, as the
``cpu`` target does) and run by ONNX Runtime's CPU provider.

Model: a BERT-base-shaped encoder (hidden 768, 12 heads, FFN 3072, erf GELU, post-LayerNorm)
with random weights and ``--layers`` blocks (2 by default, to keep the sweep to minutes on two
cores; every block is identical, so per-block ratios equal whole-model ratios). Batch 1, no
padding, so no attention mask. Variants:

* ``dense``: standard softmax attention (fused by our pass into ``MultiHeadAttention``);
* ``lrt-0.5`` / ``lrt-0.25``: every Linear of the blocks factorized with
  ``LowRankConfig(rank=r, solver="svd", min_param_saving=0.01)`` (layers where a rank-r pair
  would not save parameters stay dense: the 768x768 projections at rank 0.5);
* ``linformer-k128`` / ``linformer-k256``: ``LinformerSelfAttention`` (``share="headwise"``,
  built for exactly the measured length) over the same kind of weights;
* ``lrt-0.25+linformer-k128``: both.

Measured per length: median latency over ``--rounds`` interleaved rounds of
:func:`lrt_deploy.runtime.timing.time_runs` (each round runs every variant, order rotated, so
load from other processes hits all variants alike; the ratio to dense is taken within each
round, and its min-max over rounds is the spread), and peak memory
(resident-set growth of a fresh process from opening the session to the end of one run).
ORT runs with 2 intra-op threads and spinning off (``session.intra_op.allow_spinning = 0``).

    python benchmarks/bench_seqlen.py   # full sweep -> benchmarks/results/seqlen-sweep/
    python benchmarks/bench_seqlen.py --lengths 128 512 --rounds 3
    python benchmarks/bench_seqlen.py --profile 4096  # ORT op profile, dense vs linformer-k128
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HIDDEN, HEADS, FFN, VOCAB = 768, 12, 3072, 1000
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
VARIANTS = (
    "dense", "lrt-0.5", "lrt-0.25", "linformer-k128", "linformer-k256", "lrt-0.25+linformer-k128",
)
OUT = Path(__file__).resolve().parent / "results" / "seqlen-sweep"


def _variant_spec(name: str) -> tuple[float | None, int | None]:
    """(LRT rank fraction or None, Linformer k or None) of a variant name."""
    rank, k = None, None
    for part in name.split("+"):
        if part.startswith("lrt-"):
            rank = float(part[4:])
        elif part.startswith("linformer-k"):
            k = int(part[len("linformer-k"):])
    return rank, k


def build_encoder(layers: int, length: int, k: int | None) -> Any:
    """The seeded BERT-base-shaped encoder; the same dense weights whatever the attention."""
    import torch
    from torch import nn

    from lrt_deploy.nn import LinformerSelfAttention, StandardSelfAttention

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if k is None:
                self.attention = StandardSelfAttention(HIDDEN, HEADS)
            else:
                self.attention = LinformerSelfAttention(
                    HIDDEN, HEADS, max_length=length, k=k, share="headwise"
                )
            self.attention_norm = nn.LayerNorm(HIDDEN)
            self.up = nn.Linear(HIDDEN, FFN)
            self.down = nn.Linear(FFN, HIDDEN)
            self.output_norm = nn.LayerNorm(HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.attention_norm(x + self.attention(x))
            return self.output_norm(x + self.down(nn.functional.gelu(self.up(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    return Encoder().eval()


def matmul_flops(model: Any, length: int) -> int:
    """Multiply-add FLOPs (x2) of the MatMuls for one sequence of ``length`` tokens."""
    from torch import nn

    from lrt_deploy.nn import LinformerSelfAttention, StandardSelfAttention

    flops = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops += 2 * length * module.in_features * module.out_features
        elif isinstance(module, StandardSelfAttention):
            flops += 2 * 2 * length * length * module.hidden_size  # Q K^T and P V
        elif isinstance(module, LinformerSelfAttention):
            # E K and F V (k x n per head), then Q K'^T and P V' against k rows.
            flops += 2 * 2 * module.k * length * module.hidden_size
            flops += 2 * 2 * length * module.k * module.hidden_size
    return flops


_BASES: dict[tuple[int, float | None], Any] = {}


def _base_encoder(layers: int, rank: float | None) -> Any:
    """The standard-attention encoder, factorized at ``rank``; built once per rank (the SVD of
    every layer is the slow part, and it does not depend on the length)."""
    key = (layers, rank)
    if key not in _BASES:
        from lrt_deploy.compress import LowRankConfig, factorize_

        model = build_encoder(layers, 0, None)
        if rank is not None:
            factorize_(
                model,
                LowRankConfig(rank=rank, solver="svd", min_param_saving=0.01),
                filter_fn=lambda module, fqn: fqn.startswith("blocks."),
            )
        _BASES[key] = model
    return _BASES[key]


def variant_model(name: str, layers: int, length: int) -> Any:
    """A variant's module: the (factorized) base, with Linformer attention swapped in over the
    same query/key/value/output maps when the variant asks for it."""
    import copy

    rank, k = _variant_spec(name)
    base = _base_encoder(layers, rank)
    if k is None:
        return base
    model = build_encoder(layers, length, k)
    model.embed = copy.deepcopy(base.embed)
    for mine, theirs in zip(model.blocks, base.blocks, strict=True):
        for part in ("attention_norm", "up", "down", "output_norm"):
            setattr(mine, part, copy.deepcopy(getattr(theirs, part)))
        for part in ("query", "key", "value", "output"):
            setattr(mine.attention, part, copy.deepcopy(getattr(theirs.attention, part)))
    return model.eval()


def export_variant(name: str, layers: int, length: int, folder: Path) -> dict[str, Any]:
    """Export and fuse one variant (Linformer: for exactly ``length`` tokens; the others with a
    dynamic sequence axis, exported once and reused); return its graph path and counts."""
    import torch

    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.passes.fusion import fuse_transformer
    from lrt_deploy.graph.ops import model_bytes
    from lrt_deploy.load import LoadedModel

    _, k = _variant_spec(name)
    model = variant_model(name, layers, length)
    fused = folder / (f"{name}-{length}.onnx" if k else f"{name}.onnx")
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    row = {"path": fused, "flops": matmul_flops(model, length),
           "params": sum(p.numel() for p in model.parameters())}
    if not fused.exists():
        # Export at 16 tokens when the sequence is dynamic: the check below is then cheap.
        example = ids if k else ids[:, :16]
        loaded = LoadedModel(
            module=model, format="pickle", name=name, example_inputs={"input_ids": example},
            output_names=["output"],
            dynamic_axes={} if k else {"input_ids": {1: "sequence"}},
        )
        raw = export_onnx(loaded, folder / f"{name}.raw.onnx")
        result = fuse_transformer(raw, fused, num_heads=HEADS, hidden_size=HIDDEN,
                                  check_inputs={"input_ids": example.numpy()}, atol=1e-3)
        raw.unlink()
        fused.with_suffix(".json").write_text(json.dumps(result.details["fused"]))
    row["fused"] = json.loads(fused.with_suffix(".json").read_text())
    row["file_mb"] = model_bytes(fused) / 1e6
    return row


def session(path: Path, threads: int, profile: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    from lrt_deploy.runtime.timing import NO_SPINNING

    for key, value in NO_SPINNING.items():  # spinning would steal the other variants' cores
        options.add_session_config_entry(key, value)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time_variants(paths: list[Path], ids: Any, rounds: int, threads: int) -> tuple[Any, int]:
    """Round medians of every variant, interleaved; a turn lasts about 0.3 s for the slowest."""
    from lrt_deploy.runtime.timing import Schedule, runner, time_runs

    runners = [runner(session(path, threads), {"input_ids": ids}) for path in paths]
    probe = time_runs(runners, Schedule(runs=1, warmup=1))
    slowest_ms = max(stats.median_ms for stats in probe.all_stats())
    per_turn = max(1, min(20, round(300 / slowest_ms)))
    return time_runs(runners, Schedule(runs=rounds * per_turn, rounds=rounds, warmup=0)), per_turn


def _peak_rss_bytes() -> int:
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(path: str, length: int, threads: int) -> None:
    """Run in a fresh process: print the peak RSS growth of opening ``path`` and one run."""
    import numpy as np
    import onnxruntime  # noqa: F401  (its import is not part of the model's memory)

    ids = np.random.default_rng(1).integers(0, VOCAB, (1, length), dtype=np.int64)
    before = _rss_bytes()
    sess = session(Path(path), threads)
    sess.run(None, {"input_ids": ids})
    print(json.dumps({"peak_mb": (_peak_rss_bytes() - before) / 1e6}))


def peak_memory(path: Path, length: int, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-child", str(path), str(length), str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def measure_length(
    length: int, layers: int, rounds: int, threads: int, variants: list[str], folder: Path
) -> list[dict[str, Any]]:
    import numpy as np

    rows = {}
    for name in variants:
        _, k = _variant_spec(name)
        if k is not None and k > length:
            print(f"  {name}: skipped (k > length)", file=sys.stderr, flush=True)
            continue
        start = time.perf_counter()
        rows[name] = export_variant(name, layers, length, folder)
        print(f"  {name}: exported in {time.perf_counter() - start:.0f}s "
              f"({rows[name]['file_mb']:.1f} MB, {rows[name]['fused']})",
              file=sys.stderr, flush=True)
    for row in rows.values():
        row["peak_mb"] = peak_memory(row["path"], length, threads)
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, length), dtype=np.int64)
    timings, per_turn = _time_variants([row["path"] for row in rows.values()], ids, rounds,
                                       threads)
    times = {name: timings.round_medians(index).tolist() for index, name in enumerate(rows)}
    dense = rows["dense"]
    result = []
    for name, row in rows.items():
        ratios = [d / v for d, v in zip(times["dense"], times[name], strict=True)]
        result.append({
            "length": length,
            "variant": name,
            "median_ms": statistics.median(times[name]),
            "min_ms": min(times[name]),
            "max_ms": max(times[name]),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
            "flop_reduction": dense["flops"] / row["flops"],
            "gflops": row["flops"] / 1e9,
            "params_m": row["params"] / 1e6,
            "file_mb": row["file_mb"],
            "peak_mb": row["peak_mb"],
            "rounds": rounds,
            "runs_per_round": per_turn,
            "fused": row["fused"],
        })
    return result


def print_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| length | variant | median ms | speedup vs dense (min-max over rounds) | "
        "FLOP reduction | speedup / FLOP reduction | peak MB | file MB |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['variant']} | {r['median_ms']:.1f} | "
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | "
            f"{r['flop_reduction']:.2f}x | {r['speedup'] / r['flop_reduction']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['file_mb']:.1f} |"
        )
    return "\n".join(lines)


def crossover(rows: list[dict[str, Any]], first: str, second: str) -> float | None:
    """Length (log-interpolated) where ``second``'s speedup overtakes ``first``'s."""
    by = {(r["variant"], r["length"]): r["speedup"] for r in rows}
    lengths = sorted({r["length"] for r in rows if (second, r["length"]) in by
                      and (first, r["length"]) in by})
    previous = None
    for length in lengths:
        gap = by[(second, length)] - by[(first, length)]
        if previous is not None and previous[1] < 0 <= gap:
            x0, g0 = math.log2(previous[0]), previous[1]
            x1 = math.log2(length)
            return 2 ** (x0 + (x1 - x0) * (-g0) / (gap - g0))
        if previous is None and gap >= 0:
            return float(length)
        previous = (length, gap)
    return None


def chart(rows: list[dict[str, Any]], path: Path, layers: int) -> dict[str, float | None]:
    """Speedup vs length per variant, min-max band, each LRT / Linformer crossover marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {}
    for name in VARIANTS[1:]:
        points = [r for r in rows if r["variant"] == name]
        if not points:
            continue
        xs = [r["length"] for r in points]
        line = ax.plot(xs, [r["speedup"] for r in points], marker="o", label=name)[0]
        colors[name] = line.get_color()
        ax.fill_between(xs, [r["speedup_min"] for r in points], [r["speedup_max"] for r in points],
                        color=line.get_color(), alpha=0.12)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    top = 1.4 * max(r["speedup"] for r in rows)
    crossovers = {}
    for offset, lrt in enumerate(("lrt-0.5", "lrt-0.25")):
        where = crossover(rows, lrt, "linformer-k128")
        crossovers[f"{lrt} / linformer-k128"] = where
        if where is None:
            continue
        ax.axvline(where, color=colors.get(lrt, "red"), ls="--", lw=1)
        ax.annotate(f"linformer-k128 overtakes\n{lrt} at ~{where:.0f} tokens",
                    (where, 0.2 if offset == 0 else 0.8 * top), xytext=(-4, 4),
                    textcoords="offset points", ha="right", color=colors.get(lrt, "red"),
                    fontsize=8, backgroundcolor="white")
    # Outlier rounds (another job hitting one variant) stretch the bands; keep the medians
    # readable and let the table carry the full spread.
    ax.set_ylim(0, top)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["length"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sequence length (tokens), batch 1")
    ax.set_ylabel("speedup vs dense (dense ms / variant ms)")
    ax.set_title(f"BERT-base-shaped encoder ({layers} layers), ONNX Runtime CPU, 2 threads\n"
                 "median of interleaved rounds; band = min-max over rounds (clipped)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return crossovers


def profile(length: int, layers: int, threads: int, variants: list[str], out: Path) -> None:
    """ORT op profile of each variant at ``length``: total time per op type, printed and saved."""
    import numpy as np

    summary = {}
    with tempfile.TemporaryDirectory(prefix="seqlen-profile-") as tmp:
        for name in variants:
            row = export_variant(name, layers, length, Path(tmp))
            sess = session(row["path"], threads, profile=True)
            ids = np.random.default_rng(1).integers(0, VOCAB, (1, length), dtype=np.int64)
            sess.run(None, {"input_ids": ids})  # warm-up, left out below
            for _ in range(3):
                sess.run(None, {"input_ids": ids})
            events = json.loads(Path(sess.end_profiling()).read_text())
            runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
            per_op: dict[str, float] = {}
            for event in events:
                if event["ts"] < runs[0]:
                    continue  # the warm-up run
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    op = event["args"]["op_name"]
                    per_op[op] = per_op.get(op, 0.0) + event["dur"] / 3 / 1e3
            summary[name] = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
            print(f"{name} at {length}: " + ", ".join(
                f"{op} {ms:.1f} ms" for op, ms in summary[name].items()), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{length}.json").write_text(json.dumps(summary, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--profile", type=int, metavar="LENGTH",
                        help="only profile dense and linformer-k128 ops at this length")
    parser.add_argument("--chart-only", action="store_true",
                        help="redraw the table and chart from --out/sweep.json")
    parser.add_argument("--peak-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_memory_child(args.peak_child[0], int(args.peak_child[1]), int(args.peak_child[2]))
        return 0
    if "dense" not in args.variants:
        args.variants.insert(0, "dense")
    if args.profile:
        profile(args.profile, args.layers, args.threads,
                [v for v in args.variants if v in ("dense", "linformer-k128")], args.out)
        return 0
    if args.chart_only:
        saved = json.loads((args.out / "sweep.json").read_text())
        write_results(saved["rows"], args.out, saved["layers"])
        return 0
    rows: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="seqlen-sweep-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for length in args.lengths:
        print(f"== length {length}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows.extend(measure_length(length, args.layers, args.rounds, args.threads,
                                   args.variants, folder))
        print(f"   done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps(
            {"layers": args.layers, "threads": args.threads, "rows": rows}, indent=1))
    write_results(rows, args.out, args.layers)
    return 0


def write_results(rows: list[dict[str, Any]], out: Path, layers: int) -> None:
    table = print_table(rows)
    crossovers = chart(rows, out / "speedup-vs-length.png", layers)
    lines = [f"- {pair}: " + (f"~{where:.0f} tokens" if where else "none in the measured range")
             for pair, where in crossovers.items()]
    text = table + "\n\nCrossovers (log-interpolated):\n\n" + "\n".join(lines) + "\n"
    print(text)
    (out / "sweep.md").write_text(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
