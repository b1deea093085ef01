"""The one latency timer: warm-up, then rounds in which every timed callable takes a turn.

Several models timed in one process share the machine's state only when their runs are
interleaved: a load spell from other processes, or a frequency change, then lands on every
model alike and cancels in their ratios. The order rotates by one model per round so no model
always runs after the same neighbour.

ONNX Runtime's worker threads spin after each run by default; two sessions' spinning pools
fight for the cores when their runs alternate one by one. So a schedule whose turns are single
runs needs sessions opened with :data:`NO_SPINNING`; sessions that spin (what an app with
default settings gets) are compared in turns of several runs, each opened by ``settle``
untimed runs while the last model's threads go quiet. :func:`time_runs` refuses the
combination that would charge one model's spinning to the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "NO_SPINNING",
    "LatencyStats",
    "Schedule",
    "Timings",
    "runner",
    "time_runs",
]

#: Session config entries that turn ONNX Runtime's thread-pool spinning off.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
_SPINNING_KEY = "session.intra_op.allow_spinning"


@dataclass(frozen=True)
class Schedule:
    """How runs are timed: ``warmup`` untimed runs of each callable (one callable after the
    other), then ``rounds`` rounds; in each round every callable takes one turn of ``settle``
    untimed and its share of ``runs`` timed runs, the order rotated by one per round.

    ``rounds`` None times run by run (one timed run per turn). The ``runs`` are spread over
    the rounds as evenly as they go (31 in 3 rounds: 11, 10, 10). With ``max_seconds`` the
    timing stops after the first round that ends past it, never before ``min_rounds``.
    """

    runs: int = 30
    rounds: int | None = None
    warmup: int = 5
    settle: int = 0
    max_seconds: float | None = None
    min_rounds: int = 1

    def __post_init__(self) -> None:
        for name, least in (("runs", 1), ("warmup", 0), ("settle", 0), ("min_rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Schedule.{name} must be a whole number >= {least}, got "
                                 f"{value!r}")
        if self.rounds is not None and (not isinstance(self.rounds, int) or self.rounds < 1):
            raise ValueError(f"Schedule.rounds must be None or a whole number >= 1, got "
                             f"{self.rounds!r}")
        if self.max_seconds is not None and not self.max_seconds >= 0:
            raise ValueError(f"Schedule.max_seconds must be None or >= 0, got "
                             f"{self.max_seconds!r}")

    @property
    def turns(self) -> list[int]:
        """Timed runs per turn, one entry per round."""
        rounds = min(self.rounds or self.runs, self.runs)
        return [self.runs // rounds + (1 if r < self.runs % rounds else 0)
                for r in range(rounds)]


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of the timed runs of one callable, in milliseconds
    (``min_ms <= median_ms <= p90_ms <= p99_ms <= max_ms``; ``runs >= 1``)."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    runs: int

    #: The keys :meth:`to_dict` gives: those of a bundle report's ``latency``.
    REPORT_KEYS = ("median_ms", "p90_ms", "mean_ms", "min_ms", "runs")

    @classmethod
    def of(cls, timings_ms: Sequence[float]) -> LatencyStats:
        """Summarise run times (percentiles by linear interpolation)."""
        if not len(timings_ms):
            raise ValueError("timings_ms must hold at least one timed run")
        timings = np.asarray(timings_ms, dtype=np.float64)
        p25, median, p75, p90, p99 = np.percentile(timings, [25, 50, 75, 90, 99])
        return cls(median_ms=float(median), p90_ms=float(p90), p99_ms=float(p99),
                   mean_ms=float(timings.mean()), min_ms=float(timings.min()),
                   max_ms=float(timings.max()), iqr_ms=float(p75 - p25), runs=int(timings.size))

    def throughput(self, batch: int) -> float:
        """Rows per second at the median, for runs of ``batch`` rows."""
        return batch * 1e3 / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """The figures a bundle report stores (:data:`REPORT_KEYS`), JSON-ready."""
        return {key: getattr(self, key) for key in self.REPORT_KEYS}


@dataclass(frozen=True)
class Timings:
    """What :func:`time_runs` measured: per callable, per round, the timed runs of its turn
    in ms (every callable has the same number of rounds and runs per round)."""

    rounds_ms: tuple[tuple[tuple[float, ...], ...], ...]
    planned_rounds: int
    seconds: float

    @property
    def rounds(self) -> int:
        """Rounds timed (fewer than planned when ``max_seconds`` stopped them)."""
        return len(self.rounds_ms[0])

    def runs_ms(self, index: int) -> list[float]:
        """Every timed run of callable ``index``, in the order they ran."""
        return [t for turn in self.rounds_ms[index] for t in turn]

    def stats(self, index: int = 0) -> LatencyStats:
        """:class:`LatencyStats` of callable ``index``."""
        return LatencyStats.of(self.runs_ms(index))

    def all_stats(self) -> list[LatencyStats]:
        """:class:`LatencyStats` of every callable, in the order given."""
        return [self.stats(index) for index in range(len(self.rounds_ms))]

    def round_medians(self, index: int) -> np.ndarray:
        """Median of each round's turn of callable ``index``."""
        return np.array([float(np.median(turn)) for turn in self.rounds_ms[index]])

    def paired_ratios(self, index: int, reference: int = 0) -> np.ndarray:
        """Per round, callable ``index``'s turn median over ``reference``'s: ratios that the
        machine's drift between rounds does not bias."""
        return self.round_medians(index) / self.round_medians(reference)


class _Runner:
    """One session on fixed feeds, as a zero-argument callable."""

    def __init__(self, session: Any, feeds: Mapping[str, Any]) -> None:
        inner = getattr(session, "inference_session", None)
        if inner is not None:  # a runtime Session: checks and conversions before the clock
            self._feeds = session.prepare(feeds)
            self._session = inner
        else:
            self._feeds = dict(feeds)
            self._session = session
        self.spins = _spins(self._session)

    def __call__(self) -> Any:
        return self._session.run(None, self._feeds)


def runner(session: Any, feeds: Mapping[str, Any]) -> Callable[[], Any]:
    """A zero-argument callable running ``session`` (a runtime ``Session`` or an
    ``InferenceSession``) on ``feeds``, checked and converted once so a timed run is a bare
    ``InferenceSession.run``; its ``spins`` says whether the session's thread pool spins."""
    return _Runner(session, feeds)


def _spins(session: Any) -> bool:
    options_of = getattr(session, "get_session_options", None)
    if options_of is None:
        return False
    options = options_of()
    if options.intra_op_num_threads == 1:  # no worker threads to spin
        return False
    try:
        return options.get_session_config_entry(_SPINNING_KEY) != "0"
    except RuntimeError:  # not set: onnxruntime's default, spinning
        return True


def time_runs(
    targets: Sequence[Callable[[], Any]],
    schedule: Schedule | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> Timings:
    """Time ``targets`` (zero-argument callables, e.g. :func:`runner`) on ``schedule``
    (default: :class:`Schedule`'s defaults).

    ``progress`` is called with the number of rounds done after each round.

    Raises:
        ValueError: If no target is given, or several are timed run by run (turns of one run,
            no ``settle``) while one of them is a session whose thread pool spins.
    """
    schedule = schedule or Schedule()
    if not targets:
        raise ValueError("targets must hold at least one callable to time")
    if len(targets) > 1 and schedule.settle == 0 and any(
            getattr(target, "spins", False) for target in targets):
        raise ValueError(
            "sessions with thread-pool spinning on cannot be timed run by run: open them with "
            "NO_SPINNING as session config, or give Schedule.settle >= 1 and turns of several "
            "runs")
    for target in targets:
        for _ in range(schedule.warmup):
            target()
    turns = schedule.turns
    count = len(targets)
    timed: list[list[tuple[float, ...]]] = [[] for _ in targets]
    started = time.perf_counter()
    for round_index, block in enumerate(turns):
        for offset in range(count):
            index = (round_index + offset) % count
            timed[index].append(_turn(targets[index], schedule.settle, block))
        if progress is not None:
            progress(round_index + 1)
        elapsed = time.perf_counter() - started
        if (schedule.max_seconds is not None and round_index + 1 >= schedule.min_rounds
                and elapsed >= schedule.max_seconds):
            break
    return Timings(tuple(tuple(rounds) for rounds in timed), len(turns),
                   time.perf_counter() - started)


def _turn(target: Callable[[], Any], settle: int, runs: int) -> tuple[float, ...]:
    for _ in range(settle):
        target()
    timings = []
    for _ in range(runs):
        begin = time.perf_counter()
        target()
        timings.append((time.perf_counter() - begin) * 1e3)
    return tuple(timings)
