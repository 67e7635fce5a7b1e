"""The package's error base, kept in its lowest layer so the model raises errors the CLI maps.

``zturbo.errors`` re-exports these and adds the application-level ones. The CLI turns
any ``ZTurboError`` into one line on stderr plus a hint: exit 2 for usage,
configuration and input mistakes, 1 for runtime failures.
"""

from __future__ import annotations


class ZTurboError(Exception):
    """A failure the user can act on. ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ZTurboError):
    """Bad flags, bad arguments or a bad combination of them."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value is invalid or a config file cannot be read."""


class InputError(ZTurboError):
    """A path that must exist does not, or a file cannot be read or parsed."""

    exit_code = 2


class CheckpointError(InputError):
    """A model folder or checkpoint is missing, incomplete or corrupt."""
