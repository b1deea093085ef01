"""Healed (or freshly factorized) MiniLM variants against dense int8 per-channel, in one run.

Used by ``bench_compression.py --healed``. Each variant is exported exactly like the pipeline
does for ``--target cpu --quantize int8`` (ONNX, transformer fusion, dynamic int8 per channel);
fidelity is the cosine of the ONNX int8 output to the dense fp32 PyTorch model on BOTH shipped
held-out sets (``heldout.txt`` and the different-domain ``heldout_domain.txt``); latency is
measured in interleaved rounds so the machine's load hits every variant alike, and the ratio to
dense int8 is reported per round (median and spread).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build_variant(loaded: Any, spec: str, corpus: Path | None) -> tuple[Any, dict[str, Any]]:
    """``DIR`` of healed factor shards, or ``factorize:BUDGET[e]`` (asvd on the corpus lines the
    healing run factorized with, i.e. the same model before healing)."""
    import torch

    from lrt_deploy.compress import LowRankConfig, factorize_
    from lrt_deploy.compress.factor_shards import load_lowrank_factors, save_lowrank_factors
    from lrt_deploy.config import BudgetRank

    module = copy.deepcopy(loaded.module)
    info: dict[str, Any] = {"source": spec}
    started = time.perf_counter()
    if spec.startswith("factorize:"):
        value = spec.split(":", 1)[1]
        embeddings = value.endswith("e")
        if corpus is None:
            raise SystemExit("factorize: specs need --corpus (the healing run's corpus)")
        from lrt_deploy.data.stream import iter_text_lines

        lines = []
        for line in iter_text_lines(corpus, skip=512):  # heal_run.py's defaults
            lines.append(line)
            if len(lines) == 2048:
                break
        batches = [loaded.tokenize(lines[i : i + 32]) for i in range(0, len(lines), 32)]
        config = LowRankConfig(BudgetRank(float(value.rstrip("e"))), solver="asvd",
                               factorize_embeddings=embeddings)
        cache = corpus.parent / f"factorized-{value}"
        if list(cache.glob("lowrank-*.safetensors")):
            load_lowrank_factors(module, cache)  # the same factorization, saved by a last run
        else:
            factorize_(module, config, calibration=batches)
            save_lowrank_factors(module, cache, dtype=torch.float32)
    else:
        units = load_lowrank_factors(module, spec)
        info["units"] = len(units)
        result_file = Path(spec) / "result.json"
        if result_file.is_file():
            healed = json.loads(result_file.read_text())
            info["healing"] = {k: healed[k] for k in ("budget", "device", "gpu", "steps",
                                                      "batch_size", "lr", "select", "trainable",
                                                      "quantization") if k in healed}
            info["healing"]["seconds"] = healed["heal"]["seconds"]
            info["healing"]["best_step"] = healed["heal"]["best_step"]
    info["build_seconds"] = time.perf_counter() - started
    info["params"] = sum(p.numel() for p in module.parameters())
    return dataclasses.replace(loaded, module=module.eval()), info


def export_int8(model: Any, work: Path, key: str) -> tuple[Path, Path]:
    """The pipeline's cpu int8 path: ONNX, fusion, dynamic int8 per channel, plain (as
    ``--heal-quantized`` deploys it; without it the CLI smooths outlier channels first)."""
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.passes.fusion import fuse_transformer
    from lrt_deploy.export.targets import Target
    from lrt_deploy.quant.passes.dynamic import quantize_int8
    from lrt_deploy.quant.recipes import DynamicInt8

    target = Target.from_name("cpu", precision=DynamicInt8())
    raw = export_onnx(model, work / f"{key}.raw.onnx", opset=target.opset)
    fp32 = work / f"{key}.fp32.onnx"
    heads, hidden = model.attention_shape
    fuse_transformer(raw, fp32, num_heads=heads, hidden_size=hidden,
                     level=target.optimization_level)
    int8 = work / f"{key}.int8.onnx"
    quantize_int8(fp32, int8, per_channel=True)
    return fp32, int8


def export_int4(model: Any, work: Path, key: str, block_size: int = 32) -> Path:
    """The pipeline's ``--quantize int4`` path: Q/K/V left as three MatMuls by the fusion
    (not packed into ``Attention``), then every MatMul weight and the embedding tables to 4-bit
    blocks (``MatMulNBits``, ``GatherBlockQuantized``). Reuses ``export_int8``'s raw graph."""
    from lrt_deploy.export.passes.fusion import fuse_transformer
    from lrt_deploy.export.targets import Target
    from lrt_deploy.quant.passes.weight_only import quantize_weights_4bit
    from lrt_deploy.quant.recipes import Int4WeightOnly

    target = Target.from_name("cpu", precision=Int4WeightOnly(block=block_size))
    unpacked = work / f"{key}.fp32-unpacked.onnx"
    heads, hidden = model.attention_shape
    fuse_transformer(work / f"{key}.raw.onnx", unpacked, num_heads=heads, hidden_size=hidden,
                     level=target.optimization_level, pack_qkv=False)
    int4 = work / f"{key}.int4.onnx"
    quantize_weights_4bit(unpacked, int4, block_size=block_size, embeddings=True)
    return int4


def heldout_scorer(dense: Any) -> tuple[dict[str, list[Any]], Any]:
    """The two shipped held-out sets in batches of 32 and a ``fidelity(run_batch)`` that scores
    ``run_batch(batch) -> array`` against the dense fp32 PyTorch model on both: mean and worst
    cosine per set."""
    import numpy as np

    from lrt_deploy.data.readers import DOMAIN_HELDOUT_TEXT, HELDOUT_TEXT
    from lrt_deploy.data.stream import shipped_lines
    from lrt_deploy.metrics import cosine_per_row

    primary = dense.output_names[0]
    sets = {name: [dense.tokenize(lines[i : i + 32]) for i in range(0, len(lines), 32)]
            for name in (HELDOUT_TEXT, DOMAIN_HELDOUT_TEXT) for lines in [shipped_lines(name)]}
    refs = {name: [dense.forward(b)[primary].numpy() for b in batches]
            for name, batches in sets.items()}

    def fidelity(run_batch: Any) -> dict[str, dict[str, float]]:
        result = {}
        for name, batches in sets.items():
            cos = np.concatenate([cosine_per_row(r, run_batch(b))
                                  for r, b in zip(refs[name], batches, strict=True)])
            result[name] = {"mean_cosine": float(cos.mean()), "worst_cosine": float(cos.min())}
        return result

    return sets, fidelity


def run_healed(specs: list[str], corpus: Path | None, out: Path, runs: int, threads: int,
               rounds: int = 5, int4: tuple[str, ...] = (),
               block_size: int = 32) -> list[dict[str, Any]]:
    import numpy as np

    from lrt_deploy.graph.ops import model_bytes
    from lrt_deploy.load import load_model
    from lrt_deploy.runtime import Schedule, Session, runner, time_runs

    dense = load_model("all-MiniLM-L6-v2")
    primary = dense.output_names[0]
    _, fidelity = heldout_scorer(dense)
    rows: list[dict[str, Any]] = []
    sessions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = [("dense", dense, {"source": "dense"})]
        for spec in specs:
            name, _, source = spec.partition("=")
            print(f"== building {name} from {source}", file=sys.stderr, flush=True)
            model, info = build_variant(dense, source, corpus)
            models.append((name, model, info))
        for name, model, info in models:
            print(f"== exporting {name}", file=sys.stderr, flush=True)
            fp32, int8 = export_int8(model, work, name)
            torch_fid = fidelity(lambda b, m=model: m.forward(b)[primary].numpy())
            paths = [("fp32", fp32), ("int8", int8)]
            if name in int4:
                paths.append(("int4", export_int4(model, work, name, block_size)))
            for suffix, path in paths:
                if name != "dense" and suffix == "fp32":
                    continue
                label = f"{name} {suffix}"
                session = Session(path, threads=threads)
                sessions[label] = session
                rows.append({
                    "variant": label, "size_mb": model_bytes(path) / 1e6, **info,
                    **({"int4_block": block_size} if suffix == "int4" else {}),
                    "fidelity_torch_fp32": torch_fid,
                    "fidelity": fidelity(lambda b, s=session: s.run(
                        {k: v.numpy() for k, v in b.items()}, [primary])[primary]),
                })
        feeds = {k: v.numpy() for k, v in dense.tokenize(
            ["lrt-deploy " * 60] * 1).items()}  # batch 1, about 128 tokens
        print(f"== latency: {rounds} interleaved rounds of {runs} runs, sequence "
              f"{feeds['input_ids'].shape[1]}, {threads} threads", file=sys.stderr, flush=True)
        timings = time_runs([runner(s, feeds) for s in sessions.values()],
                            Schedule(runs=rounds * runs, rounds=rounds, warmup=0, settle=3))
        medians = {label: timings.round_medians(index).tolist()
                   for index, label in enumerate(sessions)}
    base_fp32 = next(r for r in rows if r["variant"] == "dense fp32")["size_mb"]
    base = medians["dense int8"]
    base_size = next(r for r in rows if r["variant"] == "dense int8")["size_mb"]
    for row in rows:
        mine = medians[row["variant"]]
        ratios = [m / b for m, b in zip(mine, base, strict=True)]
        row.update(
            median_ms=float(np.median(mine)),
            latency_vs_int8=float(np.median(ratios)),
            latency_vs_int8_spread=[float(min(ratios)), float(max(ratios))],
            size_vs_fp32=row["size_mb"] / base_fp32, size_vs_int8=row["size_mb"] / base_size,
            sequence=int(feeds["input_ids"].shape[1]), threads=threads,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "healed-minilm.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_rows(rows)
    chart(rows, out / "healed-minilm.png")
    return rows


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Size against mean cosine on the different-domain held-out text, with the Pareto front."""
    from common import size_fidelity_chart

    points = [{"run": "", "variant": r["variant"], "size_mb": r["size_mb"],
               "mean_cosine": r["fidelity"]["heldout_domain.txt"]["mean_cosine"]} for r in rows]
    size_fidelity_chart(points, path, "all-MiniLM-L6-v2: size vs mean cosine on "
                        "heldout_domain.txt (other domain)")


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<22} {'MB':>6} {'x fp32':>6} {'x int8':>6} {'lat x int8':>17} "
          f"{'heldout mean/worst':>19} {'domain mean/worst':>18}")
    for r in rows:
        f = r["fidelity"]
        lo, hi = r["latency_vs_int8_spread"]
        print(f"{r['variant']:<22} {r['size_mb']:>6.2f} {r['size_vs_fp32']:>6.3f} "
              f"{r['size_vs_int8']:>6.3f} {r['latency_vs_int8']:>6.3f} [{lo:.2f}-{hi:.2f}] "
              f"{f['heldout.txt']['mean_cosine']:>9.4f}/{f['heldout.txt']['worst_cosine']:.4f} "
              f"{f['heldout_domain.txt']['mean_cosine']:>8.4f}/"
              f"{f['heldout_domain.txt']['worst_cosine']:.4f}")
