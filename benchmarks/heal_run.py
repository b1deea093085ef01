"""Factorize all-MiniLM-L6-v2 and heal it on a streamed corpus, on a GPU or the CPU.

    python benchmarks/heal_run.py --corpus corpus.txt --budget 0.8 --steps 5000 \
        [--embeddings] [--device auto] [--model-dir DIR] --out results/heal-0.8
    python benchmarks/heal_run.py --corpus corpus.txt --budget 0.9 --quantization int8 \
        --trainable layers --precision fp32 --out results/qat-0.9   # quantisation-aware

Factorization: ``factorize_`` with the budget policy and the ``asvd`` solver on the first corpus
lines after the held-back ones. Healing: ``heal_`` streams the rest of the corpus (batches of
``--batch-size``, shuffled in a buffer), matches the sentence embedding and each block's output,
and keeps the step that does best on the first ``--holdback`` corpus lines (never trained on).
Before/after fidelity is measured on both shipped held-out sets (never used for any choice).
With ``--quantization int8|int4`` the student computes on fake-quantised weights (and int8
activations) as the export will, during training, selection and the simulated figures
(``before_simulated``/``after_simulated``); ``--budget 1`` keeps the model dense (quantisation-
aware healing alone). Writes the healed weights (fp16 safetensors shards: the low-rank factors,
plus every other weight but the embedding tables with ``--trainable layers``) and
``result.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def _block_names(module):  # noqa: ANN001, ANN202 - same rule as the pipeline's
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
            return [f"{name}.{index}" for index in range(len(child))]
    return []


def _fidelity(student, teacher, batches, device):  # noqa: ANN001, ANN202
    import numpy as np
    import torch

    from lrt_deploy.compress import cosine_per_row, primary_output

    values = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            ref = primary_output(teacher(**inputs)).float().cpu().numpy()
            out = primary_output(student(**inputs)).float().cpu().numpy()
            values.append(cosine_per_row(ref, out))
    cosine = np.concatenate(values)
    return {"mean_cosine": float(cosine.mean()), "worst_cosine": float(cosine.min())}


def _factorize(loaded, config, lines, batches_of, device):  # noqa: ANN001, ANN202
    from lrt_deploy.compress import factorize_

    try:
        return factorize_(loaded.module, config, calibration=batches_of(lines, 32))
    except (RuntimeError, NotImplementedError) as exc:  # a solver op missing on this device
        print(f"factorizing on {device} failed ({exc}); retrying on the CPU", flush=True)
        loaded.module.cpu()
        result = factorize_(loaded.module, config, calibration=batches_of(lines, 32))
        loaded.module.to(device)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--model-dir", default="all-MiniLM-L6-v2")
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--embeddings", action="store_true", help="factorize embeddings too")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--holdback", type=int, default=512)
    parser.add_argument("--asvd-lines", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trainable", default="lowrank",
                        choices=("lowrank", "linear", "layers"))
    parser.add_argument("--quantization", choices=("int8", "int4"),
                        help="simulate this deployed precision in the healing loop")
    parser.add_argument("--block", type=int, default=32, help="int4 block size")
    parser.add_argument("--select", default="corpus", choices=("corpus", "calibration"),
                        help="choose the best step on the held-back corpus lines, or on the "
                        "shipped calibration.txt (multi-topic, never trained on here)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--factors", type=Path,
                        help="start from these saved factors (save_lowrank_factors) instead of "
                        "factorizing: e.g. bench_compression.py's cached factorized-0.9")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from lrt_deploy.compress import LowRankConfig, heal_
    from lrt_deploy.compress.factor_shards import save_lowrank_factors
    from lrt_deploy.compress.heal import select_device
    from lrt_deploy.config import BudgetRank
    from lrt_deploy.data.readers import DOMAIN_HELDOUT_TEXT as DOMAIN_HELDOUT
    from lrt_deploy.data.readers import HELDOUT_TEXT as HELDOUT
    from lrt_deploy.data.stream import (
        StreamingTextBatches,
        iter_text_lines,
        read_head,
        shipped_lines,
    )
    from lrt_deploy.load import load_model
    from lrt_deploy.quant.simulate import FakeQuantization, quantization_aware

    device = select_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 QAT: 10-bit mantissa is ample
    quantization = (FakeQuantization(args.quantization, args.block) if args.quantization
                    else None)
    loaded = load_model(args.model_dir)
    loaded.module.float().eval()  # the fp16 carried weights are used as fp32
    teacher = copy.deepcopy(loaded.module)
    tokenize = loaded.tokenize

    def batches_of(lines, size=64):  # noqa: ANN001, ANN202
        return [tokenize(lines[i : i + size]) for i in range(0, len(lines), size)]

    held = batches_of(read_head(args.corpus, args.holdback) if args.select == "corpus"
                      else shipped_lines("calibration.txt"))
    asvd_lines = []
    for line in iter_text_lines(args.corpus, skip=args.holdback):
        asvd_lines.append(line)
        if len(asvd_lines) == args.asvd_lines:
            break
    tests = {name: batches_of(shipped_lines(name)) for name in (HELDOUT, DOMAIN_HELDOUT)}

    config = None if args.budget >= 1.0 else LowRankConfig(
        BudgetRank(args.budget), solver="asvd", factorize_embeddings=args.embeddings)
    started = time.perf_counter()
    loaded.module.to(device)
    teacher.to(device)
    if args.factors is not None:
        from lrt_deploy.compress.factor_shards import load_lowrank_factors

        load_lowrank_factors(loaded.module, args.factors)
        loaded.module.to(device)
        result = None
    elif args.budget >= 1.0:
        result = None  # dense: quantisation-aware healing alone
    else:
        result = _factorize(loaded, config, asvd_lines, batches_of, device)
    factorize_seconds = time.perf_counter() - started
    if result is not None:
        print(f"factorized on {device} in {factorize_seconds:.1f}s: {result.summary()}",
              flush=True)
    def simulated() -> dict | None:  # noqa: ANN202
        if quantization is None:
            return None
        with quantization_aware(loaded.module, quantization):
            return {name: _fidelity(loaded.module, teacher, b, device)
                    for name, b in tests.items()}

    before = {name: _fidelity(loaded.module, teacher, b, device) for name, b in tests.items()}
    before_simulated = simulated()
    print("before", json.dumps(before), json.dumps(before_simulated), flush=True)

    stream = StreamingTextBatches(args.corpus, tokenize, batch_size=args.batch_size,
                                  shuffle_buffer=20_000, holdout_lines=args.holdback, seed=0)
    heal = heal_(loaded.module, teacher, stream, steps=args.steps, lr=args.lr,
                 eval_batches=held, eval_every=args.eval_every or max(1, args.steps // 20),
                 hidden_modules=_block_names(loaded.module), device=device,
                 trainable=args.trainable, quantization=quantization,
                 precision=args.precision, progress=False)
    print(heal.summary(), flush=True)
    loaded.module.to(device)
    after = {name: _fidelity(loaded.module, teacher, b, device) for name, b in tests.items()}
    after_simulated = simulated()
    print("after", json.dumps(after), json.dumps(after_simulated), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    shards = save_lowrank_factors(loaded.module.cpu(), args.out,
                                  layers=args.trainable == "layers")
    report = {
        "budget": args.budget, "embeddings": args.embeddings, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "trainable": args.trainable,
        "select": args.select, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "factorize_seconds": factorize_seconds, "factors_from": str(args.factors or ""),
        "params_before": result.params_before if result else None,
        "params_after": result.params_after if result else None,
        "corpus_lines_read": stream.lines_read,
        "corpus_passes": stream.passes, "heal": heal.to_dict(),
        "quantization": quantization.describe() if quantization else None,
        "before": before, "after": after, "before_simulated": before_simulated,
        "after_simulated": after_simulated, "shards": [p.name for p in shards],
    }
    (args.out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
