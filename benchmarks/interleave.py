"""Interleaved latency of several ONNX graphs in one process, for ratios that survive a loaded
machine: every run times each graph once (order alternating), so a burst of load from other
processes hits all graphs of that run alike. The ratio is the median over runs of the paired
ratio (graph / baseline in the same run), which drifting load does not bias the way a ratio of
two overall medians is; the spread is its range over blocks of runs."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Timing", "cpu_session", "interleaved_latency"]


@dataclass(frozen=True)
class Timing:
    """Latency of one graph and its ratio to the baseline graph of the same run."""

    median_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float

    def cell(self) -> str:
        return (f"{self.median_ms:6.2f} ms  {self.ratio:.3f}x "
                f"[{self.ratio_low:.3f}-{self.ratio_high:.3f}]")


def cpu_session(path: str | Path, threads: int) -> Any:
    """A CPU session with ``threads`` intra-op threads and thread-pool spinning off (spinning
    threads would steal the cores the other graphs and other users need)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency(
    graphs: Mapping[str, str | Path],
    feeds: Mapping[str, np.ndarray],
    *,
    baseline: str,
    runs: int,
    warmup: int = 10,
    threads: int = 2,
    blocks: int = 5,
) -> dict[str, Timing]:
    """Median latency per graph and its paired ratio to ``baseline``, with that ratio's range
    over ``blocks`` consecutive blocks of runs."""
    sessions = {name: cpu_session(path, threads) for name, path in graphs.items()}
    inputs = {
        name: {i.name: feeds[i.name] for i in session.get_inputs()}
        for name, session in sessions.items()
    }
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, inputs[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for run in range(runs):
        for name in order if run % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            sessions[name].run(None, inputs[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    base = np.array(times[baseline])
    result = {}
    for name, values in times.items():
        paired = np.array(values) / base
        per_block = [float(np.median(block)) for block in np.array_split(paired, blocks)]
        result[name] = Timing(
            median_ms=float(np.median(values)),
            ratio=float(np.median(paired)),
            ratio_low=min(per_block),
            ratio_high=max(per_block),
        )
    return result
