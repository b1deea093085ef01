"""Latency and memory measurement for a :class:`~lrt_deploy.runtime.session.Session`.

:func:`measure_latency` times one model on fixed feeds.
:func:`measure_interleaved` times several models in rotating rounds (what ``lrt-export``
reports).
:func:`measure_model` measures one variant in one session (outputs for fidelity, then latency).
``lrt-bench`` (several bundles, interleaved) is :mod:`lrt_deploy.runtime.bench`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .session import Session

__all__ = [
    "LatencyStats",
    "ModelMeasurement",
    "measure_interleaved",
    "measure_latency",
    "measure_model",
    "peak_rss_mb",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of repeated runs, in milliseconds.

    Attributes:
        median_ms: Median run time.
        p90_ms: 90th percentile (linear interpolation), always >= ``median_ms``.
        mean_ms: Arithmetic mean.
        min_ms: Fastest run.
        runs: Number of timed runs (warm-up runs excluded).
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        """Return the stats as a JSON-ready dict."""
        return asdict(self)


def _runner(session: Session | ort.InferenceSession, feeds: Mapping[str, Any]) -> Callable[[], Any]:
    if isinstance(session, Session):
        # Check and convert once, so the timed loop measures onnxruntime, not our checks.
        prepared = session.prepare(feeds)
        inference_session = session.inference_session
    else:
        prepared = dict(feeds)
        inference_session = session
    return lambda: inference_session.run(None, prepared)


def measure_latency(
    session: Session | ort.InferenceSession,
    feeds: Mapping[str, Any],
    *,
    warmup: int = 5,
    runs: int = 30,
    max_seconds: float | None = None,
) -> LatencyStats:
    """Time repeated runs of a model on fixed feeds with ``time.perf_counter``.

    Feeds are checked once up front; each timed run is a bare ``InferenceSession.run``.

    Args:
        session: A :class:`Session` (or a raw ``onnxruntime.InferenceSession``).
        feeds: Input name -> array, as for :meth:`Session.run`.
        warmup: Untimed runs first (allocator warm-up, lazy kernel init).
        runs: Timed runs to do at most.
        max_seconds: Stop timing early once this much time is spent (at least one run is
            always timed). None runs all ``runs``.

    Returns:
        The :class:`LatencyStats` of the timed runs.

    Raises:
        ValueError: If ``runs`` < 1 or ``warmup`` < 0.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    run_once = _runner(session, feeds)
    for _ in range(warmup):
        run_once()
    timings_ms: list[float] = []
    started = time.perf_counter()
    for _ in range(runs):
        begin = time.perf_counter()
        run_once()
        end = time.perf_counter()
        timings_ms.append((end - begin) * 1e3)
        if max_seconds is not None and end - started >= max_seconds:
            break
    if len(timings_ms) < runs:
        logger.info(
            "stopped after %d of %d runs (max_seconds=%s)", len(timings_ms), runs, max_seconds
        )
    return _stats(timings_ms)


def measure_interleaved(
    sessions: Sequence[Session | ort.InferenceSession],
    feeds: Mapping[str, Any],
    *,
    warmup: int = 5,
    runs: int = 30,
    rounds: int = 3,
    settle: int = 2,
) -> list[LatencyStats]:
    """Time several models on the same feeds in rounds, so they share the machine's state.

    Each round runs every model for a block of ``runs / rounds`` timed runs, starting one model
    further along than the round before. A load spell from other processes, a thermal or
    frequency change, then lands on several models' blocks, where timing one model after
    another charges it all to whichever model was running: in one quick start that made a
    model 1.18x slower than its twin, 0.97x in the next.

    Blocks, not single runs: ONNX Runtime's worker threads spin after each run (its default,
    what an app gets), and two sessions' spinning pools fight for the cores when their runs
    alternate one by one (2x slower on 2 cores); turning spinning off cures that but adds
    ~40% to a dynamic-int8 model's time, which an app with default settings does not pay.
    ``settle`` untimed runs open each block so the last model's spinning threads go quiet.

    Args:
        sessions: The models, each a :class:`Session` (or a raw ``InferenceSession``).
        feeds: Input name -> array; each session checks and converts them once up front.
        warmup: Untimed runs of each model before the first round.
        runs: Timed runs per model, spread over the rounds.
        rounds: Blocks per model; 1 times the models one after another.
        settle: Untimed runs at the start of each block.

    Returns:
        One :class:`LatencyStats` per session, in the order given.

    Raises:
        ValueError: If ``runs`` or ``rounds`` < 1, ``warmup`` or ``settle`` < 0, or no session
            is given.
    """
    if runs < 1 or rounds < 1 or warmup < 0 or settle < 0 or not sessions:
        raise ValueError(
            f"need sessions, runs >= 1, rounds >= 1, warmup >= 0 and settle >= 0, got "
            f"{len(sessions)} sessions, runs={runs}, rounds={rounds}, warmup={warmup}, "
            f"settle={settle}")
    runners = [_runner(session, feeds) for session in sessions]
    for run_once in runners:
        for _ in range(warmup):
            run_once()
    rounds = min(rounds, runs)
    # Blocks as even as they go: 30 runs in 3 rounds are 10 + 10 + 10, 31 are 11 + 10 + 10.
    blocks = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    timings_ms: list[list[float]] = [[] for _ in runners]
    count = len(runners)
    for round_index, block in enumerate(blocks):
        for offset in range(count):
            index = (round_index + offset) % count
            for _ in range(settle):
                runners[index]()
            for _ in range(block):
                begin = time.perf_counter()
                runners[index]()
                timings_ms[index].append((time.perf_counter() - begin) * 1e3)
    return [_stats(timings) for timings in timings_ms]


def _stats(timings_ms: Sequence[float]) -> LatencyStats:
    timings = np.asarray(timings_ms)
    return LatencyStats(
        median_ms=float(np.median(timings)),
        p90_ms=float(np.percentile(timings, 90)),
        mean_ms=float(timings.mean()),
        min_ms=float(timings.min()),
        runs=len(timings_ms),
    )


@dataclass
class ModelMeasurement:
    """One model measured in one session: its outputs on evaluation batches and its latency.

    Attributes:
        outputs: Per evaluation batch, the requested output.
        latency: Timed runs on the latency feeds.
        provider: ``Session.provider_report()`` of the session that ran.
    """

    outputs: list[np.ndarray]
    latency: LatencyStats
    provider: dict[str, Any] = field(default_factory=dict)


def measure_model(
    path: str | Path,
    *,
    providers: Sequence[str],
    threads: int,
    evaluation: Sequence[Mapping[str, np.ndarray]],
    output: str,
    feeds: Mapping[str, np.ndarray],
    warmup: int = 5,
    runs: int = 30,
) -> ModelMeasurement:
    """Open ``path`` once, run it on every ``evaluation`` batch, then time it on ``feeds``.

    Args:
        path: ``.onnx`` or ``.ort`` file.
        providers: Execution providers to request, best first (fallback is reported).
        threads: Intra-op threads.
        evaluation: Input batches whose ``output`` is returned (for fidelity).
        output: Name of the output to collect.
        feeds: The fixed latency inputs.
        warmup: Untimed runs before timing.
        runs: Timed runs.

    Returns:
        The :class:`ModelMeasurement`.
    """
    session = Session(path, providers=list(providers), threads=threads)
    provider = session.provider_report()
    outputs = [session.run(batch, [output])[output] for batch in evaluation]
    latency = measure_latency(session, feeds, warmup=warmup, runs=runs)
    return ModelMeasurement(outputs, latency, provider)


def peak_rss_mb() -> float | None:
    """Return this process's peak resident set size so far, in MiB.

    This is the high-water mark of physical memory used by the whole process since it
    started (Python, numpy, onnxruntime, every model loaded), not the memory of one model,
    and it never goes down. Compare it between processes that each load one variant.

    Returns:
        Peak RSS in MiB, or None where the ``resource`` module is unavailable (Windows).
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS/iOS, in kilobytes on Linux and the BSDs.
    bytes_used = peak if sys.platform in ("darwin", "ios") else peak * 1024
    return bytes_used / (1024 * 1024)
