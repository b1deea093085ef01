"""What this machine and this process allow: thread counts and memory, checked before any work.

Every size or count a user can ask for goes through here before anything is allocated or
started: ``Session(threads=...)`` (and so ``lrt-bench --threads``, ``lrt-export --threads``),
the batch x sequence that ``lrt-bench`` and ``lrt-export`` build feeds for, and the lengths a
:class:`~lrt_deploy.runtime.TextEncoder` pads to. Asking for more than the machine has is one
:class:`ResourceLimitError` line naming the limit, instead of a segfault (thread stacks beyond
the address space), a hang (threads beyond the process limit) or an abort (a 40 GB allocation).

The bounds are deliberately loose: they refuse what cannot work, not what is merely slow.
Stdlib only, like the rest of the runtime.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Sequence
from pathlib import Path

from lrt_deploy.errors import LrtDeployError

__all__ = [
    "BYTES_PER_TOKENIZED_TOKEN",
    "MAX_THREADS",
    "ResourceLimitError",
    "available_memory",
    "check_memory",
    "check_threads",
    "thread_limit",
    "usable_cpus",
]

#: Intra-op threads per usable CPU at most: more only queue for the same cores.
THREADS_PER_CPU = 4
#: Never more intra-op threads than this, whatever the machine says.
MAX_THREADS = 1024
#: What a tokenized token costs at least (ids, masks, offsets, the token string, Python lists).
BYTES_PER_TOKENIZED_TOKEN = 64
# Used when the machine's free memory cannot be read (not Linux, no sysconf).
_FALLBACK_MEMORY = 8 * 2**30
# Default thread stack size when RLIMIT_STACK is unlimited (glibc uses 2 MiB then; 8 MiB is
# the usual soft limit and what each thread reserves of the address space).
_DEFAULT_STACK = 8 * 2**20


class ResourceLimitError(LrtDeployError):
    """A size or count beyond what the model or this machine allows; the limit is in the
    message."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else ``os.cpu_count()``, else 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _soft_limit(which: int) -> int | None:
    try:
        soft, _ = resource.getrlimit(which)
    except (ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_left() -> int | None:
    """Bytes of address space left under ``ulimit -v`` (RLIMIT_AS), None when unlimited."""
    limit = _soft_limit(resource.RLIMIT_AS)
    if limit is None:
        return None
    used = (_status_kib("VmSize") or 0) * 1024
    return max(limit - used, 0)


def thread_limit() -> tuple[int, str]:
    """The most intra-op threads this process may start, and what sets that bound."""
    cpus = usable_cpus()
    bounds = [(min(THREADS_PER_CPU * cpus, MAX_THREADS),
               f"{THREADS_PER_CPU} per usable CPU, {cpus} CPUs"
               if THREADS_PER_CPU * cpus <= MAX_THREADS else "the fixed cap")]
    processes = _soft_limit(resource.RLIMIT_NPROC)
    if processes is not None:  # ulimit -u counts threads; keep half for everything else
        running = _status_kib("Threads") or 1
        bounds.append((max((processes - running) // 2, 1),
                       f"ulimit -u {processes} processes/threads"))
    space = _address_space_left()
    if space is not None:  # each thread reserves a stack of the address space
        stack = _soft_limit(resource.RLIMIT_STACK) or _DEFAULT_STACK
        bounds.append((max(space // 2 // stack, 1),
                       f"ulimit -v: {space / 2**30:.1f} GiB of address space left, "
                       f"{stack / 2**20:.0f} MiB stack per thread"))
    return min(bounds)


def check_threads(threads: int | None, *, name: str = "threads") -> int | None:
    """``threads`` when it is a whole number between 1 and :func:`thread_limit`.

    Raises:
        ResourceLimitError: Otherwise, naming the limit and what sets it.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise ResourceLimitError(f"{name} must be a whole number, got {threads!r}")
    if threads < 1:
        raise ResourceLimitError(f"{name} must be at least 1, got {threads}")
    most, why = thread_limit()
    if threads > most:
        raise ResourceLimitError(
            f"{name}={threads} is more than this machine allows ({most}: {why}); use "
            f"{name}={min(usable_cpus(), most)} (one per CPU) or fewer"
        )
    return threads


def _cgroup_memory_left() -> int | None:
    """Bytes left under the cgroup (v2, else v1) memory limit of this process, if any."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            limit_text = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            usage = int((Path("/sys/fs/cgroup") / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 2**60:
            return max(int(limit_text) - usage, 0)
        return None
    return None


def available_memory() -> tuple[int, str]:
    """Bytes this process can still allocate, at most, and where that figure comes from:
    the least of ``MemAvailable`` (/proc/meminfo), the cgroup's memory limit and ``ulimit -v``;
    physical memory where /proc is missing; 8 GiB when nothing can be read."""
    candidates: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    if not candidates:
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            candidates.append((physical, "physical memory"))
        except (AttributeError, ValueError, OSError):
            candidates.append((_FALLBACK_MEMORY, "a fixed cap (free memory unknown)"))
    cgroup = _cgroup_memory_left()
    if cgroup is not None:
        candidates.append((cgroup, "the cgroup memory limit"))
    space = _address_space_left()
    if space is not None:
        candidates.append((space, "ulimit -v"))
    return min(candidates)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def check_memory(needed: int, what: str, fix: str) -> None:
    """Refuse work that needs more than :func:`available_memory` (``needed`` is a lower bound
    of what it allocates, so nothing that could run is refused).

    Raises:
        ResourceLimitError: ``{what} needs at least N GiB but M GiB are available (source):
            {fix}``.
    """
    free, source = available_memory()
    if needed > free:
        raise ResourceLimitError(
            f"{what} needs at least {_gib(needed)} but {_gib(free)} are available ({source}): "
            f"{fix}"
        )


_ITEMSIZE = {"float64": 8, "int64": 8, "uint64": 8, "float32": 4, "int32": 4, "uint32": 4,
             "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1,
             "bool": 1}


def tensor_bytes(shape: Sequence[int | str | None], dtype: str, batch: int,
                 sequence: int) -> int:
    """Bytes of one tensor whose axis 0 is ``batch`` and other free axes ``sequence`` (fixed
    axes keep their size): how :func:`~lrt_deploy.runtime.sweep.synthetic_feeds` shapes feeds
    and what the outputs of a run at that shape hold at least."""
    size = _ITEMSIZE.get(dtype, 1)
    for axis, dim in enumerate(shape):
        size *= dim if isinstance(dim, int) and dim > 0 else (batch if axis == 0 else sequence)
    return size


def run_bytes(tensors: Iterable[tuple[Sequence[int | str | None], str]], batch: int,
              sequence: int) -> int:
    """The feeds and outputs of one run at ``batch`` x ``sequence``: a lower bound of its
    memory (activations and the model's weights come on top)."""
    return sum(tensor_bytes(shape, dtype, batch, sequence) for shape, dtype in tensors)
