"""Every `zturbo ...` invocation in README.md and docs/*.md parses against the real CLI.

Commands are taken from fenced code blocks (every line, `&&` chains and `torchrun -m zturbo`
included) and from inline code spans. Each is parsed by the click command typer builds,
down to the subcommand, without running it: an unknown or renamed flag, a flag that lost
its value, a missing required argument or a removed command fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from zturbo.cli import build_app

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`(zturbo [^`\n]+)`")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|"}


def zturbo_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `zturbo` in one simple command, or None when it runs something else."""
    if tokens[:1] == ["zturbo"]:
        return tokens[1:]
    if tokens[:1] in (["torchrun"], ["python"], ["python3"]):
        for i in range(len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "zturbo":
                return tokens[i + 2:]
    return None


def split_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command on a line (comments dropped, `&&`, `;`, `|` split)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def documented_invocations() -> list[tuple[str, list[str], bool]]:
    """(where, args after `zturbo`, from a code block) for every invocation in the docs."""
    found = []
    for path in DOC_FILES:
        in_block, shell, pending = False, False, ""
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            fence = FENCE.match(line.strip())
            if fence:
                in_block, shell = not in_block, fence.group(1) in SHELL_LANGS
                continue
            if in_block:
                if not shell:
                    continue
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                for tokens in split_commands(pending + line):
                    args = zturbo_args(tokens)
                    if args is not None:
                        found.append((where, args, True))
                pending = ""
            else:
                for span in INLINE.findall(line):
                    found.append((where, shlex.split(span)[1:], False))
    return found


INVOCATIONS = documented_invocations()


@pytest.fixture(scope="module")
def cli():
    return typer.main.get_command(build_app())


def parse(cli, args: list[str], bare_name_ok: bool = False) -> list[str]:
    """Parse ``args`` as `zturbo` would, without running anything; returns the command path.

    ``bare_name_ok``: a command named with no arguments (`zturbo eval` in a sentence) only
    has to exist.
    """
    command, path, ctx = cli, ["zturbo"], None
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        name = args[0]
        if name not in command.commands:
            raise LookupError(f"no command '{name}' under '{' '.join(path)}'")
        ctx = command.make_context(path[-1], [], parent=ctx, resilient_parsing=True)
        command, args = command.commands[name], args[1:]
        path.append(name)
    if not (bare_name_ok and not args):
        command.make_context(path[-1], list(args), parent=ctx)
    return path[1:]


def test_the_docs_hold_invocations_of_every_command(cli):
    documented = {args[0] for _, args, _ in INVOCATIONS if args}
    assert set(cli.commands) <= documented, f"commands no doc shows: {set(cli.commands) - documented}"
    assert sum(from_block for _, _, from_block in INVOCATIONS) >= 20


@pytest.mark.parametrize("where, args, from_block", INVOCATIONS, ids=[i[0] for i in INVOCATIONS])
def test_documented_invocation_parses(cli, where, args, from_block):
    parse(cli, args, bare_name_ok=not from_block)


@pytest.mark.parametrize(
    "args",
    [["train", "--no-such-flag"], ["export", "runs/x"], ["serve-batch", "encode", "m", "--input"], ["nope"]],
)
def test_a_wrong_invocation_fails_to_parse(cli, args):
    with pytest.raises(Exception) as info:  # click's UsageError family, or LookupError for a command
        parse(cli, args)
    assert type(info.value).__name__ in {"NoSuchOption", "MissingParameter", "BadOptionUsage", "LookupError"}


def test_code_block_lines_are_split_into_commands():
    line = "python3 -m venv .venv && . .venv/bin/activate && zturbo train --profile demo   # trains"
    assert [zturbo_args(c) for c in split_commands(line)] == [None, None, ["train", "--profile", "demo"]]
    torchrun = split_commands("torchrun --nproc_per_node 8 -m zturbo train --data ./d")[0]
    assert zturbo_args(torchrun) == ["train", "--data", "./d"]
