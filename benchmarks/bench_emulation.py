"""Time ``lrt_deploy.verify.emulate.run_model`` per emulated device class, and compare each
class's sentence embeddings with the host's.

One sentence per run (batch 1, no padding), the first ``--sentences`` lines of the shipped
held-out set, tokenized on the host with the bundle's tokenizer.json; each class is one
emulated launch over all of them (so the time includes qemu start-up, onnxruntime's import and
the session's creation). The host runs the same feeds natively with the same session options
(defaults, one intra-op thread).

    python benchmarks/bench_emulation.py BUNDLE_DIR [--sentences 16] [--classes x86-avx2 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from lrt_deploy.runtime.devices import host_class
from lrt_deploy.verify import EMULATED, run_model, unavailable

HELDOUT = Path(__file__).resolve().parents[1] / "lrt_deploy" / "data" / "heldout.txt"


def feeds_for(bundle: Path, count: int, names: list[str]) -> list[dict[str, np.ndarray]]:
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.no_padding()
    lines = [s for s in HELDOUT.read_text().splitlines() if s.strip()][:count]
    feeds = []
    for line in lines:
        enc = tokenizer.encode(line)
        arrays = {"input_ids": enc.ids, "attention_mask": enc.attention_mask,
                  "token_type_ids": enc.type_ids}
        feeds.append({n: np.asarray([arrays[n]], dtype=np.int64) for n in names})
    return feeds


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--classes", nargs="*", default=list(EMULATED))
    args = parser.parse_args()
    model = args.bundle / "model.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    start = time.perf_counter()
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = feeds_for(args.bundle, args.sentences, names)
    host = [session.run(None, feed)[0] for feed in feeds]
    host_s = time.perf_counter() - start
    tokens = [int(f["input_ids"].shape[1]) for f in feeds]
    print(f"{len(feeds)} sentences, {min(tokens)}-{max(tokens)} tokens (mean "
          f"{np.mean(tokens):.1f}); onnxruntime {ort.__version__}\n")
    print("| Class | qemu -cpu | Seconds | Mean cosine vs host | Worst cosine | Max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {host_class()} (host, native) | - | {host_s:.1f} | 1 | 1 | 0 |")
    for name in args.classes:
        reason = unavailable(name)
        if reason is not None:
            print(f"| {name} | - | skipped: {reason} | | | |")
            continue
        start = time.perf_counter()
        runs = run_model(name, model, feeds)
        seconds = time.perf_counter() - start
        cos = [cosine(r[0], h) for r, h in zip(runs, host, strict=True)]
        diff = max(float(np.abs(r[0] - h).max()) for r, h in zip(runs, host, strict=True))
        print(f"| {name} | {EMULATED[name].cpu} | {seconds:.1f} | {np.mean(cos):.6f} | "
              f"{min(cos):.6f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
