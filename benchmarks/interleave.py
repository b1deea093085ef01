"""Several ONNX graphs timed run by run in one process, each as a paired ratio to a baseline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Timing", "cpu_session", "interleaved_latency"]


@dataclass(frozen=True)
class Timing:
    """One graph's median latency and its paired ratio to the baseline timed in the same
    rounds (median over rounds, with the low..high of that median over blocks of rounds)."""

    median_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float

    def cell(self) -> str:
        return (f"{self.median_ms:6.2f} ms  {self.ratio:.3f}x "
                f"[{self.ratio_low:.3f}-{self.ratio_high:.3f}]")


def cpu_session(path: str | Path, threads: int) -> Any:
    """A CPU session with ``threads`` intra-op threads and thread-pool spinning off, as
    :func:`~lrt_deploy.runtime.timing.time_runs` needs to time graphs run by run."""
    import onnxruntime as ort

    from lrt_deploy.runtime.timing import NO_SPINNING

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
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
    from lrt_deploy.runtime.timing import Schedule, runner, time_runs

    names = list(graphs)
    runners = []
    for name in names:
        session = cpu_session(graphs[name], threads)
        runners.append(runner(session, {i.name: feeds[i.name] for i in session.get_inputs()}))
    timings = time_runs(runners, Schedule(runs=runs, warmup=warmup))
    reference = names.index(baseline)
    result = {}
    for index, name in enumerate(names):
        paired = timings.paired_ratios(index, reference)
        per_block = [float(np.median(block)) for block in np.array_split(paired, blocks)]
        result[name] = Timing(
            median_ms=timings.stats(index).median_ms,
            ratio=float(np.median(paired)),
            ratio_low=min(per_block),
            ratio_high=max(per_block),
        )
    return result
