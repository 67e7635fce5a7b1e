"""Every `zturbo ...` invocation in README.md and docs/ parses: its command exists and takes those flags.

Only the parsing runs (no training, no files): what the commands then do with the
paths is tested per command, and per artifact kind in test_artifacts.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from zturbo.cli import _click_exceptions, build_app

ROOT = Path(__file__).resolve().parents[2]
INVOCATION = re.compile(r"(?:^|`|&& |-m )(zturbo (?:[^`#|]|\|(?!\s))+)")


def _invocations() -> list[str]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text(encoding="utf-8").splitlines():
            if line.startswith("| `zturbo") and line.count("`zturbo") == line.count("` /") + 1:
                continue  # the commands table names commands (`zturbo train`), it does not run them
            for match in INVOCATION.finditer(line):
                found.append(match.group(1).split(" # ")[0].strip())
    return sorted(set(found))


def _parse(argv: list[str]) -> None:
    command = typer.main.get_command(build_app())
    ctx = command.make_context("zturbo", argv)
    rest = ctx._protected_args + ctx.args
    while hasattr(command, "resolve_command") and rest:
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
        rest = ctx._protected_args + ctx.args if hasattr(command, "resolve_command") else []


@pytest.mark.parametrize("text", _invocations())
def test_documented_invocation_parses(text):
    _parse(shlex.split(text)[1:])


def test_the_parse_check_rejects_an_unknown_flag():
    assert len(_invocations()) > 10, "the README's invocations were not found"
    with pytest.raises(_click_exceptions()):
        _parse(["train", "--no-such-flag", "3"])
