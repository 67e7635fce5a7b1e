"""`zturbo info`: versions, devices and which optional backends import."""

from __future__ import annotations

import typer

from zturbo.commands._common import JsonOpt


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(json_out: JsonOpt = False) -> None:
        """Print versions, devices, CUDA/cuDNN and the optional backends that import."""
        from zturbo.console import print_json, stdout
        from zturbo.environment import collect_environment

        env = collect_environment()
        if json_out:
            print_json(env)
            return
        from rich.table import Table

        table = Table(show_header=False, title="zturbo environment", title_justify="left")
        for key, value in env.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            table.add_row(key, str(value))
        stdout.print(table)
