"""Options shared by several commands, and the flags -> settings step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zturbo.config import Settings, load_settings

ProfileOpt = Annotated[
    Optional[str],
    typer.Option("--profile", "-p", help="Profile name (ultrafast, fast, highres, ultra, standard, demo) or .toml path."),
]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="Config file (TOML, JSON or YAML) over the profile.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]


def settings_from(
    profile: str | None, config: Path | None, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> Settings:
    """Resolve settings from the flags a user actually gave (``None`` means not given)."""
    return load_settings(profile, config, overrides, **kwargs)


def parse_int_list(text: str | None, name: str) -> list[int] | None:
    from zturbo.errors import UsageError

    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{name} must be a comma-separated list of integers, got '{text}'") from None
    if not values:
        raise UsageError(f"{name} is empty")
    return values


def parse_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [v for v in text.replace(" ", "").split(",") if v]
