"""Terminal output: logs and progress on stderr, data and --json on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Off a terminal rich would wrap tables at 80 columns; keep rows whole for logs and pipes.
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
stdout = Console(width=None if sys.stdout.isatty() else 160)


def print_json(obj: Any) -> None:
    """One machine-readable object on stdout (never wrapped or coloured)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress(quiet: bool = False, *extra_columns) -> Progress:
    """A rich progress bar on stderr; silent when quiet or stderr is not a terminal."""
    disable = quiet or not stderr.is_terminal
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=disable,
        transient=False,
    )


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {message}", highlight=False)


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(message, highlight=False)
