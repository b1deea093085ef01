"""Size / latency / fidelity of LRT variants of all-MiniLM-L6-v2 against the dense baseline,
at several ranks, with a size-vs-fidelity chart (the Pareto front).

    python benchmarks/bench_minilm.py [--ranks 0.25 0.375 0.5] [--target cpu] [--runs 30]

Each rank is one ``export_bundle`` run, so its dense fp32 and dense int8 rows are measured in
the same process run, on the same inputs, threads and provider as its LRT rows; every ratio is
against that run's dense fp32. Writes ``results/minilm.json`` and ``results/minilm.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from common import load, measure, print_table, size_fidelity_chart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=float, nargs="+", default=[0.25, 0.375, 0.5])
    parser.add_argument("--target", default="cpu", choices=("cpu", "mobile"))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from lrt_deploy.compress import LowRankConfig
    from lrt_deploy.export.targets import Target
    from lrt_deploy.pipeline import BenchmarkSettings

    settings = BenchmarkSettings(runs=args.runs, threads=args.threads)
    rows = []
    for rank in args.ranks:
        new, _ = measure(partial(load, "minilm"), Target.from_name(args.target, quantize="int8"),
                         LowRankConfig(rank=rank), settings, f"rank {rank}")
        rows.extend(new)
    print(f"\nall-MiniLM-L6-v2, target {args.target}, batch 1, sequence 128, {args.threads} "
          "threads; ratios vs dense fp32 of the same run")
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm.json").write_text(json.dumps(rows, indent=2) + "\n")
    size_fidelity_chart(rows, args.out / "minilm.png", "all-MiniLM-L6-v2: size vs fidelity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
