"""The installed package version, readable from every layer without importing the package root."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("zturbo")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
