"""Child process of :func:`lrt_deploy.runtime.memory.measure_peak_memory`: one bundle's memory.

``python -m lrt_deploy.runtime._memory_probe BUNDLE BATCH SEQUENCE THREADS RUNS``; not public.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__: list[str] = []

_MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """Read a ``VmRSS``/``VmHWM`` line (kB) from ``/proc/self/status``; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _current_rss_mb() -> tuple[float | None, str]:
    kib = _status_kib("VmRSS")
    return (kib / 1024, "proc") if kib is not None else (None, "unavailable")


def _peak_rss_mb() -> tuple[float | None, str]:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024, "/proc/self/status VmHWM"
    from lrt_deploy.runtime.memory import peak_rss_mb

    return peak_rss_mb(), "getrusage ru_maxrss"


def main(argv: list[str]) -> dict[str, Any]:
    """Open, run and measure one bundle; return the figures."""
    path, batch, sequence, threads, runs = argv[0], *map(int, argv[1:5])
    import numpy  # noqa: F401  (imported before the baseline so it is not counted as model)
    import onnxruntime  # noqa: F401

    from lrt_deploy.runtime.sweep import bundle_feeds, open_for_benchmark

    # Imported before the baseline too: the tokenizer's library is not the model's memory.
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        pass
    baseline, _ = _current_rss_mb()
    bundle = open_for_benchmark(path, threads=threads or None)
    after_load, _ = _current_rss_mb()
    feeds = bundle_feeds(bundle, batch, sequence)
    for _ in range(max(runs, 1)):
        bundle.session.run(None, feeds)
    peak, source = _peak_rss_mb()
    result: dict[str, Any] = {
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "after_load_rss_mb": after_load,
        "model_mb": None if peak is None or baseline is None else peak - baseline,
        "source": source,
        "batch": batch,
        "sequence": sequence,
        "threads": threads or None,
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
