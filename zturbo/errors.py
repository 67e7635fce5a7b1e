"""Errors that the CLI turns into one line on stderr plus a hint.

Library code raises these for conditions a user can fix; ``zturbo.cli.main`` maps
them to exit codes (2 for usage and configuration mistakes, 1 for runtime
failures) and prints the traceback only with ``ZTURBO_DEBUG=1``.
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


class MissingDependencyError(ZTurboError):
    """An optional package is needed for what was asked."""

    exit_code = 1

    def __init__(self, package: str, purpose: str, extra: str | None = None):
        install = f"pip install 'zturbo[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed", f"run: {install}")
        self.package = package


class DeviceError(ZTurboError):
    """A device was asked for that this machine does not have (e.g. CUDA)."""


def require(module: str, purpose: str, extra: str | None = None):
    """Import an optional dependency or raise MissingDependencyError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no branch - message depends on what is missing
        raise MissingDependencyError(module.split(".")[0], purpose, extra) from exc
