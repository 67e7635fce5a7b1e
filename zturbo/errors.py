"""Errors that the CLI turns into one line on stderr plus a hint.

Library code raises these for conditions a user can fix; ``zturbo.cli.main`` maps
them to exit codes (2 for usage and configuration mistakes, 1 for runtime
failures) and prints the traceback only with ``ZTURBO_DEBUG=1``.
"""

from __future__ import annotations

import importlib

from zturbo.model.errors import CheckpointError, ConfigError, InputError, UsageError, ZTurboError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "InputError",
    "MissingDependencyError",
    "UsageError",
    "ZTurboError",
    "require",
]


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
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no branch - message depends on what is missing
        raise MissingDependencyError(module.split(".")[0], purpose, extra) from exc
