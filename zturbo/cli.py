"""The `zturbo` command: a Typer app assembled from the explicit list ``COMMANDS``.

Each listed module in ``zturbo/commands`` defines ``register(app)``. The list is
written out rather than discovered from the folder, so an unreadable install or a
module that fails to import is reported as such, never as "No such command".
``main()`` turns known errors into one line on stderr plus a hint.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import torch
import typer
from rich.markup import escape

from zturbo.console import stderr
from zturbo.errors import ZTurboError
from zturbo.version import __version__

# Every command module, in the order `zturbo --help` lists them.
COMMANDS = ("prepare", "train", "eval", "bench", "export", "serve_batch", "config_cmd", "info")


class CommandImportError(ZTurboError):
    """A command module failed to import: a broken install or a missing dependency."""

    def __init__(self, name: str, exc: BaseException):
        first = str(exc).splitlines()[0] if str(exc) else ""
        super().__init__(
            f"the '{name}' command module (zturbo.commands.{name}) failed to import: {type(exc).__name__}: {first}",
            "reinstall zturbo (pip install -e .); ZTURBO_DEBUG=1 shows the traceback",
        )


def _click_exceptions() -> tuple[type[BaseException], ...]:
    """ClickException classes typer may raise: its vendored click (typer >= 0.29) or click itself."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zturbo {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="zturbo",
        help="Train, evaluate, benchmark, export and serve compact AutoencoderKL-style image VAEs.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    ) -> None:
        """zturbo: compact image VAEs, measured honestly."""

    for name in COMMANDS:
        try:
            module = importlib.import_module(f"zturbo.commands.{name}")
        except Exception as exc:
            raise CommandImportError(name, exc) from exc
        module.register(app)
    return app


def _debug() -> bool:
    return os.environ.get("ZTURBO_DEBUG", "") not in ("", "0", "false", "no")


def _fail(message: str, hint: str | None, code: int) -> int:
    # Messages carry user paths and shell snippets like 'zturbo[gpu]': never read them as markup.
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        stderr.print(f"[dim]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (no sys.exit), for tests and embedding."""
    try:
        app = build_app()
        result = app(args=argv, prog_name="zturbo", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return _fail("aborted", None, 130)
    except _click_exceptions() as exc:
        if _debug():
            traceback.print_exc()
        exc.show()
        return exc.exit_code
    except ZTurboError as exc:
        if _debug():
            traceback.print_exc()
        return _fail(exc.message, exc.hint, exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", None, 130)
    except MemoryError:
        return _fail("out of memory", "use a smaller batch or image size", 1)
    except Exception as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            return _fail(f"out of GPU memory: {str(exc).splitlines()[0]}", "use a smaller batch or image size", 1)
        if _debug():
            raise
        return _fail(
            f"unexpected {type(exc).__name__}: {exc}", "rerun with ZTURBO_DEBUG=1 for the traceback and report it", 1
        )


def main() -> None:
    sys.exit(run(sys.argv[1:]))
