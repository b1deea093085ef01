"""Lazy text corpora: stream a large one-sentence-per-line file in bounded memory."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from lrt_deploy.errors import LrtDeployError

__all__ = [
    "StreamingTextBatches",
    "iter_text_lines",
    "healing_data",
    "read_head",
    "shipped_lines",
]

logger = logging.getLogger(__name__)


def shipped_lines(name: str) -> list[str]:
    """Non-empty stripped lines of a text file shipped in ``lrt_deploy.data`` (small files)."""
    text = resources.files("lrt_deploy.data").joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_file(path: str | Path) -> Path:
    file = Path(path)
    if not file.is_file():
        raise LrtDeployError(f"text corpus '{file}' does not exist: give a UTF-8 file, one "
                             "sentence per line")
    return file


def iter_text_lines(path: str | Path, *, skip: int = 0) -> Iterator[str]:
    """Yield the non-empty stripped lines of ``path`` one at a time, after the first ``skip``."""
    file = _check_file(path)
    seen = 0
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise LrtDeployError(
                    f"text corpus '{file}' line {number} is not UTF-8: convert the file to UTF-8 "
                    "text, one sentence per line"
                ) from exc
            if not line:
                continue
            seen += 1
            if seen > skip:
                yield line


def read_head(path: str | Path, count: int) -> list[str]:
    """The first ``count`` non-empty lines of ``path``, reading no further."""
    lines: list[str] = []
    if count <= 0:
        return lines
    for line in iter_text_lines(path):
        lines.append(line)
        if len(lines) == count:
            break
    return lines


class StreamingTextBatches:
    """Tokenized batches streamed from a text file, one pass per ``iter``, holding at most
    ``shuffle_buffer`` lines and one batch whatever the file size.

    Args:
        shuffle_buffer: Lines held for shuffling; 1 keeps the file order.
        holdout_lines: The first non-empty lines skipped (held back for choosing the best step).
        seed: Seed of the shuffle; pass ``p`` uses ``seed + p``.
    """

    def __init__(
        self,
        path: str | Path,
        tokenize: Callable[[Sequence[str]], dict[str, Any]],
        *,
        batch_size: int = 32,
        shuffle_buffer: int = 10_000,
        holdout_lines: int = 0,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or shuffle_buffer < 1 or holdout_lines < 0:
            raise LrtDeployError(
                f"invalid streaming options (batch_size {batch_size}, shuffle_buffer "
                f"{shuffle_buffer}, holdout_lines {holdout_lines}): use positive sizes"
            )
        self.path = _check_file(path)
        self.tokenize = tokenize
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.holdout_lines = holdout_lines
        self.seed = seed
        self.drop_last = drop_last
        self.lines_read = 0
        self.passes = 0

    def _shuffled_lines(self, rng: random.Random) -> Iterator[str]:
        buffer: list[str] = []
        for line in iter_text_lines(self.path, skip=self.holdout_lines):
            self.lines_read += 1
            if len(buffer) < self.shuffle_buffer:
                buffer.append(line)
                continue
            # Buffer full: emit a random element and put the new line in its place.
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = line
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed + self.passes)
        self.passes += 1
        chunk: list[str] = []
        produced = 0
        for line in self._shuffled_lines(rng):
            chunk.append(line)
            if len(chunk) == self.batch_size:
                produced += 1
                yield self.tokenize(chunk)
                chunk = []
        if chunk and not self.drop_last:
            produced += 1
            yield self.tokenize(chunk)
        if produced == 0:
            raise LrtDeployError(
                f"text corpus '{self.path}' has no training lines after the {self.holdout_lines} "
                f"held back (a batch needs {self.batch_size}): give a larger corpus"
            )


def healing_data(
    path: str | Path,
    tokenize: Callable[[Sequence[str]], dict[str, Any]],
    *,
    holdback_lines: int = 256,
    batch_size: int = 32,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
) -> tuple[StreamingTextBatches, list[dict[str, Any]]]:
    """A corpus split for healing: ``(stream of the rest to train on, the first
    ``holdback_lines`` lines tokenized to choose the best step on)``."""
    held = read_head(path, holdback_lines)
    if not held:
        raise LrtDeployError(f"text corpus '{path}' has no text lines")
    selection = [tokenize(held[i : i + batch_size]) for i in range(0, len(held), batch_size)]
    stream = StreamingTextBatches(path, tokenize, batch_size=batch_size,
                                  shuffle_buffer=shuffle_buffer, holdout_lines=len(held),
                                  seed=seed)
    return stream, selection
