"""`zturbo config show|profiles`: the resolved configuration and the profile table."""

from __future__ import annotations

import typer

from zturbo.commands._common import ConfigOpt, JsonOpt, ProfileOpt, settings_from


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Show the resolved configuration or the profile table.", no_args_is_help=True)

    @group.command("show")
    def show(profile: ProfileOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
        """Print the configuration after defaults < profile < --config < ZTURBO_* environment."""
        from zturbo.console import print_json, stdout

        settings = settings_from(profile, config)
        data = settings.model_dump(mode="json")
        if json_out:
            print_json(data)
            return

        from rich.table import Table

        for section, values in data.items():
            if not isinstance(values, dict):
                stdout.print(f"[bold]{section}[/] = {values!r}", highlight=False)
                continue
            table = Table(title=f"[{section}]", title_justify="left", show_header=False, box=None, pad_edge=False)
            for key, value in values.items():
                table.add_row(f"  {key}", repr(value))
            stdout.print(table)

    @group.command("profiles")
    def profiles(json_out: JsonOpt = False) -> None:
        """List the profiles: resolution, batch, channels, z, parameters and GFLOPs per image."""
        from zturbo.console import print_json, stdout
        from zturbo.bench.profiles_table import profile_rows

        rows = profile_rows()
        if json_out:
            print_json(rows)
            return
        from rich.table import Table

        table = Table(title="zturbo profiles (FLOPs counted with torch.utils.flop_counter at the profile's resolution)")
        for col in ("profile", "res", "batch", "channels", "z", "attn", "params M", "enc GFLOP", "dec GFLOP"):
            table.add_column(col, justify="left" if col in ("profile", "channels") else "right", no_wrap=True)
        for r in rows:
            table.add_row(
                r["profile"], str(r["resolution"]), str(r["batch_size"]), _widths(r),
                str(r["latent_channels"]), "yes" if r["mid_block_attention"] else "no", f"{r['parameters'] / 1e6:.1f}",
                f"{r['encode_gflops']:.0f}", f"{r['decode_gflops']:.0f}",
            )
        stdout.print(table)
        for r in rows:
            stdout.print(f"  [bold]{r['profile']}[/]: {r['description']}", highlight=False)

    app.add_typer(group, name="config")


def _widths(row: dict) -> str:
    """Encoder widths, and the decoder's after a '|' when they differ."""
    enc, dec = row["block_out_channels"], row["decoder_block_out_channels"]
    text = "/".join(map(str, enc))
    return text if dec == enc else f"{text} | dec {'/'.join(map(str, dec))}"
