"""Embed the same sentences with one bundle in Python, Node and headless Chromium; compare.

Python runs ``lrt_deploy.runtime.Session`` + ``TextEncoder``; Node runs ``src/node.js`` on
onnxruntime-node; the browser runs ``web/`` on onnxruntime-web (WebAssembly), served by
``serve.js`` and driven by ``run-page.js``. Every runtime embeds the same batch, so the
cosine to Python and the timings compare like with like::

    python samples/js/compare.py out/all-MiniLM-L6-v2-mobile [--threads 2] [--runs 20]

tests/samples/test_js_runtimes.py uses the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHROMIUM",
    "JS_DIR",
    "SENTENCES",
    "cosines",
    "node_embeddings",
    "page_embeddings",
    "python_embeddings",
    "serve_bundle",
]

JS_DIR = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# Short and long, accents, digits, punctuation, a word outside the vocabulary, and one text
# longer than 128 tokens so truncation is exercised.
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument on stage!",
    "The stock market fell sharply today; investors were worried.",
    "Café crème, naïve résumé — déjà vu at 10:45 p.m.",
    "Low-rank factorization shrinks transformer weights (W ≈ D·E) for phones.",
    "zxqvbnm qwertyuiop asdfgh",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 20),
    "Hello phone",
]


def python_embeddings(bundle: Path, sentences: Sequence[str], *, threads: int = 2,
                      runs: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Embed with the Python runtime, timed like the JS side (open, first batch, runs)."""
    from lrt_deploy.runtime import Session, TextEncoder
    from lrt_deploy.runtime.timing import Schedule, time_runs

    start = time.perf_counter()
    session = Session(bundle, threads=threads)
    encoder = TextEncoder.from_bundle(bundle)
    open_ms = (time.perf_counter() - start) * 1000

    def embed() -> np.ndarray:
        feeds = encoder.encode(list(sentences), input_names=session.input_names)
        return session.run(feeds)[session.output_names[0]]

    start = time.perf_counter()
    vectors = embed()
    first_ms = (time.perf_counter() - start) * 1000
    stats = time_runs([embed], Schedule(runs=runs, warmup=warmup)).stats()
    return {
        "runtime": "onnxruntime (python)",
        "embeddings": vectors.tolist(),
        "openMs": open_ms,
        "firstInferenceMs": first_ms,
        "latency": {"runs": stats.runs, "medianMs": stats.median_ms, "p90Ms": stats.p90_ms},
        # ru_maxrss is KiB on Linux: the peak resident set of the whole Python process.
        "memory": {"peakRssBytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
    }


def _write_sentences(sentences: Sequence[str], folder: Path) -> Path:
    path = folder / "sentences.json"
    path.write_text(json.dumps(list(sentences)), encoding="utf-8")
    return path


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not installed; run scripts/setup_tests.sh")
    return node


def node_embeddings(bundle: Path, sentences: Sequence[str], *, threads: int = 2,
                    runs: int = 20, timeout: float = 300) -> dict[str, Any]:
    """Run ``src/node.js`` on onnxruntime-node and return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [_node(), "src/node.js", "--bundle", str(bundle),
             "--sentences", str(_write_sentences(sentences, Path(tmp))),
             "--threads", str(threads), "--runs", str(runs)],
            cwd=JS_DIR, capture_output=True, text=True, timeout=timeout, check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"node src/node.js failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


@contextmanager
def serve_bundle(bundle: Path) -> Iterator[str]:
    """Start ``serve.js`` on a free port of 127.0.0.1; yield the page URL."""
    proc = subprocess.Popen(
        [_node(), "serve.js", "--bundle", str(bundle), "--port", "0"],
        cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"(http://127\.0\.0\.1:\d+/web/)", line)
        if not match:
            proc.kill()
            errors = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"serve.js did not start: {line}{errors}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def page_embeddings(url: str, sentences: Sequence[str], *, threads: int = 2, runs: int = 20,
                    timeout: float = 300) -> dict[str, Any]:
    """Open the page in headless Chromium through ``run-page.js``; return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [_node(), "run-page.js", "--url", url, "--chromium", CHROMIUM,
             "--sentences", str(_write_sentences(sentences, Path(tmp))),
             "--threads", str(threads), "--runs", str(runs), "--timeout", str(int(timeout))],
            cwd=JS_DIR, capture_output=True, text=True, timeout=timeout + 60, check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"run-page.js failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout)


def cosines(reference: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> np.ndarray:
    """Cosine of each row of ``other`` to the same row of ``reference``."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _row(name: str, result: dict[str, Any], reference: dict[str, Any]) -> str:
    cos = cosines(reference["embeddings"], result["embeddings"])
    memory = result["memory"]
    peak = memory.get("peakRssBytes") or memory.get("bytes")
    label = "peak RSS" if "peakRssBytes" in memory else memory.get("source", "")
    return (
        f"| {name} | {cos.min():.6f} | {result['latency']['medianMs']:.1f} | "
        f"{result['latency']['p90Ms']:.1f} | {result['openMs']:.0f} | "
        f"{result['firstInferenceMs']:.1f} | {peak / 2**20:.0f} MiB ({label}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    python = python_embeddings(bundle, SENTENCES, threads=args.threads, runs=args.runs)
    node = node_embeddings(bundle, SENTENCES, threads=args.threads, runs=args.runs)
    with serve_bundle(bundle) as url:
        page = page_embeddings(url, SENTENCES, threads=args.threads, runs=args.runs)
    print(f"bundle {bundle}: {len(SENTENCES)} sentences in one batch, {args.threads} threads, "
          f"{args.runs} runs after 3 warm-up; page: {page.get('browser')}, "
          f"{page['threads']} wasm thread(s)")
    print("| Runtime | Worst cosine to Python | Median (ms) | p90 (ms) | Open (ms) | "
          "First inference (ms) | Memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(_row("Python (onnxruntime)", python, python))
    print(_row(f"Node (onnxruntime-node {node.get('version')})", node, python))
    print(_row(f"Chromium (onnxruntime-web {page.get('version')}, wasm)", page, python))
    if args.json:
        args.json.write_text(json.dumps({"python": python, "node": node, "page": page}, indent=1))


if __name__ == "__main__":
    main()
