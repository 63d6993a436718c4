"""Typed exceptions raised by minicpmv.

Every error a user can cause (bad input, bad checkpoint, unknown version) is one of these
classes, so callers can catch precisely and the CLI/server can map them to messages and
status codes. This module imports nothing from the rest of the package.
"""

from __future__ import annotations


class MiniCPMVError(Exception):
    """Base class of every error raised on purpose by minicpmv."""


class UnknownVersionError(MiniCPMVError, ValueError):
    """The checkpoint (or the caller) names a model version this package does not know."""


class ConfigError(MiniCPMVError, ValueError):
    """A config file is missing, malformed or holds a value we cannot honour."""


class CheckpointError(MiniCPMVError):
    """A checkpoint directory or repo cannot be loaded (missing files/shards, bad tensors)."""


class MissingWeightsError(CheckpointError):
    """Parameters of the model have no tensor in the checkpoint."""


class UnexpectedWeightsError(CheckpointError):
    """The checkpoint holds tensors that no parameter of the model uses."""


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor has a different shape from the parameter it should fill."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint would need code execution (pickle weights) to load."""


class OfflineError(CheckpointError):
    """A hub repo id was given but the hub cannot be reached and nothing is cached."""


class InputError(MiniCPMVError, ValueError):
    """A message, image or argument given by the caller is invalid."""


class ImageError(InputError):
    """An image is missing, unreadable, truncated or too large."""


class VideoError(InputError):
    """A video is missing, unreadable, corrupt, empty or uses a codec that cannot be decoded."""


class AudioError(InputError):
    """An audio clip has the wrong sample rate, dtype or shape, is too long, or is unreadable."""


class PlaceholderMismatchError(InputError):
    """The number of image placeholders does not match the number of images / features."""


class ContextLengthError(InputError):
    """The prompt (plus requested new tokens) does not fit in the model's context."""


class TokenizerError(MiniCPMVError):
    """Tokenizer files are missing or inconsistent."""


class TemplateError(MiniCPMVError):
    """The chat template cannot be rendered for these messages."""


class FeatureNotAvailableError(MiniCPMVError, NotImplementedError):
    """The checkpoint supports a feature that this package does not implement yet."""


class OutputError(MiniCPMVError):
    """An output (checkpoint, export, quantized copy) cannot be written: the folder is in use, the
    disk is full, permissions, ... Nothing half-written is left behind."""


class OverloadedError(MiniCPMVError):
    """The batch engine's queue is full (or it is shutting down); retry the request later."""
