"""Each target preset (cpu, mobile, cuda) on MiniLM and a BERT-base-sized model: size, latency
and fidelity of dense and LRT variants, with the fused-op counts of each graph.

    python benchmarks/bench_targets.py [--models minilm bert-base] [--targets cpu mobile cuda]

Ratios are against the dense fp32 variant of the same run. The cuda preset (fp16) runs on
whatever provider this machine has: on a CPU-only machine the table says CPUExecutionProvider and
its latency is not a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from common import MODELS, add_measurement_args, load, measure, print_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--targets", nargs="+", default=["cpu", "mobile", "cuda"],
                        choices=("cpu", "mobile", "cuda"))
    parser.add_argument("--rank", type=float, default=0.5)
    add_measurement_args(parser)
    args = parser.parse_args()

    from lrt_deploy.compress import LowRankConfig
    from lrt_deploy.export.targets import Target
    from lrt_deploy.pipeline import BenchmarkSettings
    from lrt_deploy.quant.recipes import DynamicInt8

    settings = BenchmarkSettings(runs=args.runs, threads=args.threads)
    rows = []
    for model in args.models:
        for name in args.targets:
            target = Target.from_name(name) if name == "cuda" else Target.from_name(
                name, precision=DynamicInt8())
            new, _ = measure(partial(load, model), target, LowRankConfig(rank=args.rank),
                             settings, f"{model}/{name}")
            rows.extend(new)
    print(f"\nbatch 1, sequence 128, {args.threads} threads; LRT rank {args.rank}; "
          "ratios vs dense fp32 of the same run")
    print_table(rows, fused=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "targets.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
