"""Errors users can act on, one line each; imports nothing (the torch-free runtime uses it)."""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleExistsError",
    "ConfigError",
    "CorruptModelError",
    "ExampleInputsError",
    "ExportValidationError",
    "LrtDeployError",
    "ModelNotFoundError",
    "UnknownTargetError",
    "UnsupportedFormatError",
    "UnsupportedOperationError",
    "UntrustedPickleError",
]


class LrtDeployError(ValueError):
    """Base class of every error caused by the user's input rather than by a bug."""


class ConfigError(LrtDeployError):
    """A user choice (a config field or an argument) is invalid; the message names the field."""


class ModelNotFoundError(LrtDeployError):
    """The model path does not exist."""


class UnsupportedFormatError(LrtDeployError):
    """The path exists but is not a model format lrt-deploy reads."""


class CorruptModelError(LrtDeployError):
    """The file has a known format but cannot be read."""


class UntrustedPickleError(LrtDeployError):
    """The file is a pickled module and loading it would run code the user has not trusted."""


class ExampleInputsError(LrtDeployError):
    """Example inputs for export could not be derived or were malformed."""


class UnsupportedOperationError(LrtDeployError):
    """The requested step cannot be applied to this kind of model."""


class ExportValidationError(LrtDeployError):
    """The exported graph does not reproduce PyTorch's outputs within tolerance."""


class BundleExistsError(LrtDeployError):
    """The output folder exists and overwriting was not asked for."""


class UnknownTargetError(LrtDeployError):
    """The deployment target name is not one of the presets (``cpu``, ``cuda``, ``mobile``)."""


class BundleError(LrtDeployError):
    """A bundle cannot be used: unreadable manifest, a file outside it, a checksum mismatch."""
