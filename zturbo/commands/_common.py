"""Options shared by several commands, and the flags -> settings step."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zturbo.config import Settings, available_profiles, load_settings

ProfileOpt = Annotated[
    Optional[str],
    typer.Option("--profile", "-p", help=f"Profile name ({', '.join(available_profiles())}) or .toml path."),
]
LATENT_FAMILY_HELP = (
    "A single .safetensors file's latent family when its shapes fit several and it carries no zturbo metadata: "
    "flux1 (FLUX.1, Z-Image), sd3, sdxl, sd1 (SD1/SD2), flux2."
)
LatentFamilyOpt = Annotated[Optional[str], typer.Option("--latent-family", help=LATENT_FAMILY_HELP)]
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


def model_arg(path: Any, latent_family: str | None, job: str, quiet: bool = False) -> Any:
    """A model path as given, or, for a single file, the artifact it resolves to with ``--latent-family``.

    Says in one line on stderr what the file holds and where its latent factors come from.
    Folders and exports pass through untouched: the job resolves them itself.
    """
    from zturbo.artifacts import ALL_KINDS, require

    if path is None or not Path(path).is_file():
        return path
    artifact = require(path, ALL_KINDS, job, latent_family)
    if artifact.single_file is not None:
        say_line(artifact.single_file.note, quiet)
    return artifact


def say_line(message: str, quiet: bool = False) -> None:
    """``message`` on stderr as one line (no wrapping, no markup), unless ``quiet``."""
    from rich.markup import escape

    from zturbo.console import stderr

    if not quiet:
        stderr.print(escape(message), highlight=False, soft_wrap=True)


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


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its spellings (the older underscore ones too) and the setting(s) it sets.

    ``names`` like ``"--batch-size --batch_size"`` (a boolean pair as ``"--compile/--no-compile"``);
    ``settings`` like ``"train.batch_size"``, several separated by spaces (each gets the value);
    ``parse`` turns the flag's text into the value, or into a mapping ``{setting: value}`` for a
    flag that sets several settings to different values.
    """

    names: str
    settings: str
    type: Any
    help: str | None = None
    parse: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return self.names.split()[0].split("/")[0].lstrip("-").replace("-", "_")


def overrides_from(table: Sequence[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """The nested overrides for ``load_settings`` from the flags given (``None``: not given)."""
    tree: dict[str, Any] = {}
    for flag in table:
        value = values.get(flag.dest)
        if value is None:
            continue
        value = flag.parse(value) if flag.parse else value
        targets = value if isinstance(value, dict) else {s: value for s in flag.settings.split()}
        for setting, target_value in targets.items():
            section, field = setting.split(".")
            tree.setdefault(section, {})[field] = target_value
    return tree


def with_flags(table: Sequence[Flag]):
    """Add ``table``'s flags to a command; the command receives them as ``overrides`` for ``load_settings``."""

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "overrides"]
        for flag in table:
            option = typer.Option(*flag.names.split(), help=flag.help)
            params.append(
                inspect.Parameter(
                    flag.dest, inspect.Parameter.KEYWORD_ONLY, default=None,
                    annotation=Annotated[Optional[flag.type], option],
                )
            )

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {flag.dest: kwargs.pop(flag.dest) for flag in table}
            return func(overrides=overrides_from(table, values), **kwargs)

        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def parse_tile(text: str) -> int | str:
    """``--tile``: a tile side in pixels, or 'auto'."""
    from zturbo.errors import UsageError

    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--tile must be a number of pixels or 'auto', got '{text}'") from None


def tile_flags(section: str) -> list[Flag]:
    """``--tile``, ``--tile-mode``, ``--tile-memory-gb`` and ``--tile-recompute`` for a job whose settings section is ``section``."""
    return [
        Flag("--tile", f"{section}.tile", str,
             "Tiled encode/decode: tile side in pixels (exact: same result, bounded memory), or 'auto' (tiles "
             "only when the whole image would not fit).", parse=parse_tile),
        Flag("--tile-mode", f"{section}.tile_mode", str, "exact (default) or fast (one approximate pass per tile)."),
        Flag("--tile-memory-gb", f"{section}.tile_memory_gb", float,
             "Memory budget for --tile auto (default: free device memory, or available RAM on CPU)."),
        Flag("--tile-recompute/--no-tile-recompute", f"{section}.tile_recompute", bool,
             "Exact decode in the least memory: recompute the largest layers' inner maps (more compute)."),
    ]
