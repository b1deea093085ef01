"""Verification: how a bundle computes on device classes other than the host's."""

from __future__ import annotations

from .emulate import EMULATED, NOT_EMULATED, EmulationError, run_model, unavailable

__all__ = ["EMULATED", "NOT_EMULATED", "EmulationError", "run_model", "unavailable"]
