"""Settings layering (defaults < profile < file < env < flags), validation, CLI frame."""

import json

import pytest

from zturbo.cli import run
from zturbo.config import DEFAULT_PROFILE, load_settings, profile_dir, read_config_file
from zturbo.errors import ConfigError


def test_defaults_then_profile():
    assert load_settings().model_dump() == load_settings(DEFAULT_PROFILE).model_dump()
    defaults = load_settings(default_profile=None)
    for name in ("ultrafast", "standard"):
        settings = load_settings(name)
        sections = {k: v for k, v in read_config_file(profile_dir() / f"{name}.toml").items() if isinstance(v, dict)}
        assert sections and settings.profile == name
        for section, values in sections.items():
            for field, value in values.items():
                assert getattr(getattr(settings, section), field) == value, f"{section}.{field}"
        # The profile changed something the built-in defaults say otherwise.
        assert any(getattr(getattr(defaults, s), f) != v for s, vs in sections.items() for f, v in vs.items())


def test_each_layer_overrides_the_one_below(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nbatch_size = 7\nlearning_rate = 5e-4\n[data]\nnum_workers = 1\n")
    s = load_settings("ultrafast", cfg)
    assert s.train.batch_size == 7 and s.train.learning_rate == 5e-4  # file over profile
    assert s.data.image_size == 768  # profile still applies where the file is silent
    monkeypatch.setenv("ZTURBO_TRAIN__BATCH_SIZE", "5")
    s = load_settings("ultrafast", cfg)
    assert s.train.batch_size == 5 and s.train.learning_rate == 5e-4  # env over file
    s = load_settings("ultrafast", cfg, {"train": {"batch_size": 3, "learning_rate": None}})
    assert s.train.batch_size == 3 and s.train.learning_rate == 5e-4  # flag over env; unset flags ignored


def test_json_and_yaml_files_and_flat_keys_refused(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"data": {"image_size": 512}, "train": {"batch_size": 16, "learning_rate": 1e-4}}))
    s = load_settings("fast", j)
    assert (s.data.image_size, s.train.batch_size, s.train.learning_rate) == (512, 16, 1e-4)
    flat = tmp_path / "flat.json"  # keys outside a section are no setting: one line names the first
    flat.write_text(json.dumps({"image_size": 512, "batch_size": 16}))
    with pytest.raises(ConfigError, match="image_size") as info:
        load_settings("fast", flat)
    assert "\n" not in info.value.message
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  latent_channels: 4\n")
    assert load_settings("fast", y).model.latent_channels == 4


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model": {"block_out_channels": [96, 100]}}, "model"),
        ({"data": {"image_size": 1020}}, "data.image_size"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"no_such_field": 1}}, "train.no_such_field"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_settings("fast", overrides=overrides)
    assert field in info.value.message and "\n" not in info.value.message


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nbatch_size=")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_settings("fast", bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings("fast", tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown profile"):
        load_settings("nope")


def test_cli_invalid_env_value_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ZTURBO_TRAIN__LEARNING_RATE", "-3")
    assert run(["config", "show"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_cli_debug_shows_traceback(monkeypatch, capsys):
    monkeypatch.setenv("ZTURBO_DEBUG", "1")
    assert run(["config", "show", "--profile", "nope"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_config_show_json_is_valid(capsys):
    assert run(["config", "show", "--profile", "demo", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(load_settings("demo").model_dump_json())


def test_help_lists_exactly_the_registered_commands(capsys):
    import typer

    from zturbo.cli import build_app

    expected = {
        "prepare", "train", "eval", "bench", "export", "import", "serve-batch", "config", "info",
    }
    # import-diffusers: import's former name, still registered, left out of the help.
    assert set(typer.main.get_command(build_app()).commands) == expected | {"import-diffusers"}
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    section = out.split("Commands", 1)[1]
    listed = {line.strip("│ ").split()[0] for line in section.splitlines() if line.startswith("│ ") and line[2] != " "}
    assert listed == expected


def test_version(capsys):
    from zturbo import __version__

    assert run(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_profiles_table_json(capsys):
    assert run(["config", "profiles", "--json"]) == 0
    rows = {r["profile"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {
        "ultrafast", "fast", "highres", "ultra", "standard", "demo", "flux-decoder-fast", "flux-decoder-ultrafast"
    }
    # A slim decoder in FLUX.1's latent space: FLUX.1's encoder (same encode FLOPs), fast's decoder widths.
    distilled = rows["flux-decoder-fast"]
    assert distilled["decoder_block_out_channels"] == [96, 192, 384, 384]
    assert distilled["encode_gflops"] == rows["standard"]["encode_gflops"]
    assert distilled["decode_gflops"] < rows["standard"]["decode_gflops"]
    assert rows["standard"]["parameters"] == 83_819_683
    # Same architecture at the same resolution: identical counted FLOPs; standard costs more than fast.
    assert rows["highres"]["parameters"] == rows["fast"]["parameters"]
    assert rows["standard"]["decode_gflops"] > rows["fast"]["decode_gflops"] > rows["ultrafast"]["decode_gflops"]
    assert all(r["description"] for r in rows.values())


def test_info_json(capsys):
    assert run(["info", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["torch"] and "backends" in env and isinstance(env["cuda_available"], bool)


def test_demo_images_are_packaged():
    from zturbo.data import demo_dir, demo_images, load_demo_images

    paths = demo_images()
    assert len(paths) == 15 and (demo_dir() / "SOURCES.md").is_file()
    images = load_demo_images(64)
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)


def test_a_folder_named_like_a_profile_does_not_hide_it(tmp_path, monkeypatch):
    """`zturbo train --profile demo` next to a folder called demo/ (say, the demo images) still means the profile."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "mine.toml").write_text("[train]\nbatch_size = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings("demo").profile == "demo"
    assert load_settings("mine.toml").train.batch_size == 3  # a file is still read as a config


def test_profile_help_names_every_packaged_profile():
    from zturbo.commands._common import ProfileOpt
    from zturbo.config import available_profiles

    text = ProfileOpt.__metadata__[0].help
    names = available_profiles()
    assert {"flux-decoder-fast", "flux-decoder-ultrafast", "demo"} <= set(names)
    assert all(name in text.split("(")[1].split(")")[0].split(", ") for name in names), text
