"""Quieting third-party loggers for a block, whose hints our own progress lines already cover."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["quiet_loggers"]


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Set the named loggers (``""`` is the root logger) to ``level`` for the block, then
    restore each one's own level."""
    loggers = [logging.getLogger(name or None) for name in names]
    saved = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(level)
    try:
        yield
    finally:
        for log, previous in zip(loggers, saved, strict=True):
            log.setLevel(previous)
