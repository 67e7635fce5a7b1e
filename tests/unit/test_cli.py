"""The CLI's command list and its failure modes."""

from __future__ import annotations

import importlib

from zturbo import cli


def test_every_listed_command_is_registered(capsys):
    assert cli.run(["--help"]) == 0
    shown = capsys.readouterr().out
    for name in cli.COMMANDS:
        command = {"serve_batch": "serve-batch", "config_cmd": "config"}.get(name, name)
        assert command in shown, command


def test_a_command_module_that_fails_to_import_is_named_in_one_line(monkeypatch, capsys):
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "zturbo.commands.prepare":
            raise ImportError("libfoo.so.1: cannot open shared object file")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    assert cli.run(["prepare", "--help"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("error: the 'prepare' command module (zturbo.commands.prepare) failed to import")
    assert "ImportError: libfoo.so.1: cannot open shared object file" in lines[0]
    assert "No such command" not in err
    assert "Traceback" not in err


def test_debug_shows_the_import_traceback(monkeypatch, capsys):
    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "zturbo.commands.eval":
            raise ImportError("boom")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    monkeypatch.setenv("ZTURBO_DEBUG", "1")
    assert cli.run(["eval", "--help"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ImportError: boom" in err
