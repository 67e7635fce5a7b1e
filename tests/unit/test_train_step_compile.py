"""The training step: compile setting, graph breaks, and no host sync per micro-batch."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from zturbo.config import load_settings
from zturbo.errors import UsageError
from zturbo.train import compile as train_compile
from zturbo.train.engine import TrainEngine

TINY = {
    "model": {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4,
              "mid_block_add_attention": False, "sample_size": 32},
    "data": {"image_size": 32, "num_workers": 0},
    "train": {"batch_size": 4, "learning_rate": 2e-3, "warmup_steps": 0, "precision": "fp32"},
    "loss": {"perceptual_weight": 0.0, "disc_weight": 0.5, "disc_start": 0},
}


def tiny(**train) -> object:
    return load_settings(None, None, {**TINY, "train": {**TINY["train"], **train}}, default_profile=None)


# 2 shared cores: one intra-op thread is faster and keeps CPU numerics reproducible.
pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_compile_setting_takes_auto_on_off_and_old_booleans():
    assert tiny().train.compile == "auto"
    assert tiny(compile=True).train.compile == "on" and tiny(compile=False).train.compile == "off"
    assert tiny(compile="false").train.compile == "off"
    with pytest.raises(Exception, match="compile"):
        tiny(compile="sometimes")
    cpu = torch.device("cpu")
    assert train_compile.resolve_compile("auto", cpu) is False  # auto is off on the CPU
    assert train_compile.resolve_compile("off", torch.device("cuda")) is False


def test_compile_on_without_a_working_inductor_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(train_compile.shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="C\\+\\+ compiler") as info:
        train_compile.resolve_compile("on", torch.device("cpu"))
    assert "\n" not in info.value.message
    messages = []
    assert train_compile.resolve_compile("auto", torch.device("cuda"), messages.append) in (True, False)


@pytest.mark.parametrize("missing, device, says", [
    ("torch._inductor", "cpu", "has no inductor"),
    ("triton", "cuda", "needs Triton, which is not installed"),
])
def test_each_missing_piece_of_inductor_is_named(monkeypatch, missing, device, says):
    real = train_compile.importlib.util.find_spec
    monkeypatch.setattr(train_compile.importlib.util, "find_spec", lambda name: None if name == missing else real(name))
    with pytest.raises(UsageError, match=says):
        train_compile.resolve_compile("on", torch.device(device))
    assert train_compile.resolve_compile("auto", torch.device(device)) is False  # auto trains eagerly instead


class SyncCounter:
    """Counts the Python-level reads of tensor values (each one waits for the device on a GPU)."""

    NAMES = ("item", "tolist", "__float__", "__bool__", "__int__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))

    def _wrap(self, name, real):
        @functools.wraps(real)
        def counted(tensor, *args, **kwargs):
            self.calls.append(name)
            return real(tensor, *args, **kwargs)

        return counted


@pytest.mark.parametrize("disc_start", [0, 10**6])  # GAN term (adaptive weight, discriminator step) on / off
def test_no_value_read_back_per_micro_batch(monkeypatch, disc_start):
    """Four micro-batches read back exactly as often as one: once per optimizer step, after the loop."""
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    counts = {}
    for micro in (1, 4):
        settings = tiny(micro_batch_size=micro)
        settings.loss.disc_start = disc_start
        engine = TrainEngine(settings, torch.device("cpu"), total_steps=10)
        engine.step(x, 0)  # first step: lazy state (optimizer moments) is built outside the count
        counter = SyncCounter(monkeypatch)
        result = engine.step(x, 1)
        monkeypatch.undo()
        counts[micro] = list(counter.calls)
        assert not result.skipped and result.micro_batch == micro
    # Identical lists: nothing scales with the micro-batch count. The step's own read-back is the one
    # tolist; the item calls after it are the CPU optimizer's and scheduler's step counters.
    assert counts[1] == counts[4], counts
    assert counts[1].count("tolist") == 1 and counts[1][0] == "tolist", counts[1]


@pytest.mark.slow
@pytest.mark.parametrize("disc_weight, breaks", [(0.0, 0), (0.5, 1)])
def test_compiled_step_graph_breaks_are_counted_and_results_match_eager(monkeypatch, disc_weight, breaks):
    """Dynamo's tracing (aot_eager: no code generation, seconds on a CPU) of the trainer's graphs.

    Without a discriminator nothing breaks; with one exactly one break, the decoder's last
    conv, kept eager on purpose (see zturbo.train.engine). The losses equal the eager step's: the
    same kernels run in the same order, so only the summation order inside AOTAutograd's
    regrouped graphs can differ, a few fp32 roundings (~1e-7 each) on values of order 1.
    """
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="aot_eager"))
    torch._dynamo.reset()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    results = {}
    for mode in ("off", "on"):
        settings = tiny(compile=mode, micro_batch_size=2)
        settings.loss.disc_weight = disc_weight
        messages = []
        engine = TrainEngine(settings, torch.device("cpu"), total_steps=10, log=messages.append)
        results[mode] = [engine.step(x, i).terms for i in range(2)]
    report = engine.compile_report()
    assert report["compiled"] and report["graph_breaks"] == breaks, report
    assert any(m.startswith(f"torch.compile: {breaks} graph break") for m in messages), messages
    for eager, compiled in zip(results["off"], results["on"]):
        assert eager.keys() == compiled.keys()
        for key in eager:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key


# -- the --compile flag -------------------------------------------------------------------------------------


def test_compile_flag_takes_auto_on_off_and_defaults_to_auto(capsys, tmp_path):
    from zturbo.cli import run

    base = ["train", "--dry-run", "--json", "--data", str(tmp_path)]
    assert run(base) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["train"]["compile"] == "auto"
    for value in ("auto", "on", "off"):
        assert run([*base, "--compile", value]) == 0
        assert json.loads(capsys.readouterr().out)["settings"]["train"]["compile"] == value
    assert run([*base, "--compile", "sometimes"]) == 2
    err = capsys.readouterr().err
    assert "train.compile" in err and "'auto', 'on' or 'off'" in err


def test_compile_on_without_a_working_inductor_stops_the_cli_in_one_line(
    monkeypatch, capsys, tiny_config, small_data, tmp_path
):
    """The probe sees no C++ compiler: exit 2, one error line and one hint, before the run folder is made."""
    from zturbo.cli import run

    monkeypatch.setattr(train_compile.shutil, "which", lambda name: None)
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(tiny_config), "--data", str(small_data), "--output", str(run_dir),
            "--max-steps", "1"]
    assert run([*args, "--compile", "on"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: train.compile=on: torch.compile cannot run here") and "C++ compiler" in lines[0]
    assert lines[1].startswith("hint: use --compile off")
    assert not run_dir.exists()
