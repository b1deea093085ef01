"""Peak resident memory: of this process so far, or of one bundle in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["measure_peak_memory", "peak_rss_mb"]

_PROBE = "lrt_deploy.runtime._memory_probe"


def peak_rss_mb() -> float | None:
    """This process's peak resident set size so far in MiB (the whole process, never going
    down), or None where the ``resource`` module is unavailable (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS/iOS, in kilobytes on Linux and the BSDs.
    bytes_used = peak if sys.platform in ("darwin", "ios") else peak * 1024
    return bytes_used / (1024 * 1024)


def measure_peak_memory(
    path: str | os.PathLike[str],
    batch: int,
    sequence: int,
    *,
    threads: int | None = None,
    runs: int = 3,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """A bundle's peak resident memory, measured in a fresh Python process.

    The child imports numpy and onnxruntime, records its resident set, opens the bundle,
    runs it ``runs`` times at the given shape and records the high-water mark again
    (``VmHWM`` from ``/proc/self/status`` on Linux, ``ru_maxrss`` elsewhere). The peak is
    the whole process (interpreter and libraries included); ``model_mb`` = peak - the RSS
    before the bundle was opened, i.e. what opening and running this bundle added.

    Returns:
        ``{"peak_rss_mb", "baseline_rss_mb", "model_mb", "source", "batch", "sequence"}``,
        or ``{"error": ...}`` when the child failed (the caller goes on).
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", _PROBE, str(path), str(batch), str(sequence),
               str(threads or 0), str(runs)]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout_s:.0f} s"}
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory probe failed: {last}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])
