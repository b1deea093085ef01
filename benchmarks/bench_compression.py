"""The compression trade-off: dense fp32/int8 against LRT variants (uniform rank, global
parameter budgets with embeddings, healed), each fp32 and int8, with the Pareto chart.

    python benchmarks/bench_compression.py [--model minilm|bert-base] [--configs ...] [--runs 30]

Configs (default: all): rank0.5 (uniform half rank: only the FFN layers save parameters),
budget0.9e ... budget0.7e (global parameter budget incl. the word embeddings), and -heal
variants (the same, then healed by distillation).
Each config is one ``export_bundle`` run, so the dense rows it is compared with are measured in
the same run; every ratio is against that run's dense fp32. The dense rows of the first run are
printed once. Writes ``results/compression-<model>.json`` and ``.png``.

    python benchmarks/bench_compression.py --healed NAME=DIR NAME=factorize:0.9 [--corpus C]

measures MiniLM variants rebuilt from healed low-rank factor shards (``heal_run.py`` output,
e.g. from a GPU) or factorized here, against dense int8 per channel in one interleaved run, with
fidelity on both shipped held-out sets (see ``healed.py``). Writes ``results/healed-minilm.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from common import MODELS, add_measurement_args, load, measure, print_table, size_fidelity_chart

from lrt_deploy.config import BudgetRank

CONFIGS = {
    "rank0.5": ({"rank": 0.5}, 0),
    "budget0.9e": ({"policy": BudgetRank(0.9), "factorize_embeddings": True}, 0),
    "budget0.85e": ({"policy": BudgetRank(0.85), "factorize_embeddings": True}, 0),
    "budget0.85e-heal": ({"policy": BudgetRank(0.85), "factorize_embeddings": True}, 300),
    "budget0.8e": ({"policy": BudgetRank(0.8), "factorize_embeddings": True}, 0),
    "budget0.7e": ({"policy": BudgetRank(0.7), "factorize_embeddings": True}, 0),
    "budget0.7e-heal": ({"policy": BudgetRank(0.7), "factorize_embeddings": True}, 200),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=MODELS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--target", default="cpu", choices=("cpu", "mobile"))
    parser.add_argument("--healed", nargs="+", metavar="NAME=DIR|NAME=factorize:BUDGET[e]",
                        help="measure these MiniLM variants instead of the configs (healed.py)")
    parser.add_argument("--corpus", type=Path, help="the healing corpus, for factorize: specs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--int4", nargs="*", default=(), metavar="NAME",
                        help="with --healed: also a 4-bit MatMul + Gather variant of these")
    parser.add_argument("--int4-block", type=int, default=32,
                        help="values per scale of the 4-bit variants (64: smaller)")
    add_measurement_args(parser)
    args = parser.parse_args()
    if args.healed:
        from healed import run_healed

        run_healed(args.healed, args.corpus, args.out, args.runs, args.threads, args.rounds,
                   tuple(args.int4), args.int4_block)
        return 0

    from lrt_deploy.compress import LowRankConfig
    from lrt_deploy.export.targets import Target
    from lrt_deploy.pipeline import BenchmarkSettings
    from lrt_deploy.quant.recipes import DynamicInt8

    settings = BenchmarkSettings(runs=args.runs, threads=args.threads)
    rows = []
    for index, name in enumerate(args.configs):
        options, heal = CONFIGS[name]
        new, _ = measure(
            partial(load, args.model), Target.from_name(args.target, precision=DynamicInt8()),
            LowRankConfig(**options), settings, name, heal_steps=heal,
        )
        rows.extend(r for r in new if index == 0 or not r["variant"].startswith("dense"))
    print(f"\n{args.model}, target {args.target}, batch 1, sequence 128, {args.threads} threads; "
          "ratios vs dense fp32 of the same run")
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compression-{args.model}.json").write_text(json.dumps(rows, indent=2) + "\n")
    size_fidelity_chart(rows, args.out / f"compression-{args.model}.png",
                        f"{args.model}: file size vs fidelity to dense fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
