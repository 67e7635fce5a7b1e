"""The commands' flag tables: every flag names a real setting, and each spelling belongs to one flag."""

from __future__ import annotations

import importlib
import typing

import pytest

from zturbo.commands._common import Flag, overrides_from
from zturbo.config import Settings, load_settings

TABLES = {
    name: importlib.import_module(f"zturbo.commands.{name}").FLAGS
    for name in ("train", "eval", "bench", "export", "prepare")
}
TABLES["serve-batch encode"] = importlib.import_module("zturbo.commands.serve_batch").ENCODE_FLAGS
TABLES["serve-batch decode"] = importlib.import_module("zturbo.commands.serve_batch").DECODE_FLAGS


@pytest.mark.parametrize("command", list(TABLES))
def test_every_flag_sets_a_setting_that_exists(command):
    for flag in TABLES[command]:
        for setting in flag.settings.split():
            section, field = setting.split(".")
            annotation = Settings.model_fields[section].annotation
            # The model section is a union of the families' configs (AutoencoderKL, tiny): the
            # field must be one of some family's.
            members = typing.get_args(annotation) or (annotation,)
            families = [typing.get_args(m)[0] if typing.get_args(m) else m for m in members]  # unwrap Annotated
            assert any(field in family.model_fields for family in families), f"{flag.names} -> {setting}"


@pytest.mark.parametrize("command", list(TABLES))
def test_each_spelling_belongs_to_one_flag(command):
    spellings = [n for flag in TABLES[command] for name in flag.names.split() for n in name.split("/")]
    assert len(spellings) == len(set(spellings))
    dests = [flag.dest for flag in TABLES[command]]
    assert len(dests) == len(set(dests))


def test_overrides_come_only_from_flags_given():
    table = [
        Flag("--image-size --image_size", "data.image_size model.sample_size", int),
        Flag("--lr", "train.learning_rate", float),
        Flag("--metrics", "eval.metrics eval.lpips_nets", str, parse=lambda t: {"eval.metrics": [t]}),
    ]
    overrides = overrides_from(table, {"image_size": 64, "lr": None, "metrics": "psnr"})
    assert overrides == {
        "data": {"image_size": 64},
        "model": {"sample_size": 64},
        "eval": {"metrics": ["psnr"]},
    }
    settings = load_settings("demo", overrides=overrides)
    assert (settings.data.image_size, settings.model.sample_size) == (64, 64)
