"""zturbo bench: report schema, comparisons, skipped cases, FLOP counts, the baseline gate and the CLI."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import torch

from zturbo.bench import (
    SchemaError,
    compare_with_baseline,
    make_plan,
    parse_tolerance,
    run_bench,
    to_markdown,
    validate_report,
)
from zturbo.bench.flops import flops_per_image
from zturbo.bench.runner import CPU_DEFAULTS
from zturbo.bench.timing import percentile, time_interleaved, time_rounds
from zturbo.cli import run
from zturbo.config import ModelConfig, load_settings
from zturbo.errors import UsageError
from zturbo.bench.flops import vae_flops

TINY = """
[model]
block_out_channels = [32, 64]
layers_per_block = 1
latent_channels = 4
sample_size = 32
[data]
image_size = 32
[train]
batch_size = 2
"""
WIDER = """
[model]
block_out_channels = [32, 64]
layers_per_block = 2
latent_channels = 8
sample_size = 32
[data]
image_size = 32
"""
REPEATS = 2


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "tiny.toml").write_text(TINY)
    (root / "wider.toml").write_text(WIDER)
    return {"tiny": root / "tiny.toml", "wider": root / "wider.toml", "root": root}


def tiny_settings(configs, **bench):
    base = {"resolutions": [16], "batch_sizes": [1, 2], "repeats": REPEATS, "warmup": 1, "device": "cpu",
            "peak_matmul_size": 128}
    return load_settings(None, configs["tiny"], {"bench": {**base, **bench}})


@pytest.fixture(scope="module")
def report(configs):
    settings = tiny_settings(configs, backends=["torch", "trt"], against=str(configs["wider"]))
    return run_bench(settings, profile_name="tiny")


def ok_cases(report):
    return [c for c in report["cases"] if c["status"] == "ok"]


# ---------------------------------------------------------------------------------------------------------
# The report


def test_report_validates_against_schema_and_survives_json(report):
    pytest.importorskip("jsonschema", reason="the full schema check needs jsonschema (dev extra)")
    validate_report(report)
    validate_report(json.loads(json.dumps(report)))
    assert report["complete"] is True
    assert report["environment"]["torch"] == torch.__version__
    assert "git_commit" in report["environment"]


def test_schema_rejects_broken_reports(report):
    pytest.importorskip("jsonschema", reason="the full schema check needs jsonschema (dev extra)")
    measured = copy.deepcopy(report)
    next(c for c in measured["cases"] if c["status"] == "ok")["median_ms"] = None
    with pytest.raises(SchemaError, match="median_ms"):
        validate_report(measured)
    unexplained = copy.deepcopy(report)
    next(c for c in unexplained["cases"] if c["status"] == "skipped")["reason"] = None
    with pytest.raises(SchemaError):
        validate_report(unexplained)
    with pytest.raises(SchemaError):
        validate_report({**report, "schema": "something-else/1"})


def test_every_subject_what_and_batch_is_measured_consistently(report):
    cases = ok_cases(report)
    # 2 subjects x encode/decode x 2 batch sizes, on the torch backend.
    assert {(c["subject"], c["what"], c["batch"]) for c in cases} == {
        (s, w, b) for s in ("tiny", "wider") for w in ("encode", "decode") for b in (1, 2)
    }
    peak = report["peak"]["tflops"]
    for c in cases:
        assert c["backend"] == "torch"
        assert len(c["samples_ms"]) == REPEATS
        assert c["min_ms"] <= c["median_ms"] <= c["p90_ms"] <= max(c["samples_ms"]) + 1e-3
        assert c["images_per_s"] == pytest.approx(c["batch"] * 1000 / c["median_ms"])
        assert c["tflops"] == pytest.approx(c["flops_per_image"] * c["batch"] / (c["median_ms"] / 1000) / 1e12)
        assert c["mfu"] == pytest.approx(c["tflops"] / peak)
        assert c["peak_memory_mb"] > 0 and c["memory_kind"] == "process_peak_rss"


def test_unavailable_backend_is_skipped_with_a_reason_not_a_crash(report):
    trt = [c for c in report["cases"] if c["backend"] == "trt"]
    assert len(trt) == 2 * 2 * 2
    for c in trt:
        assert c["status"] == "skipped"
        assert c["reason"] and ("trt" in c["reason"].lower() or "tensorrt" in c["reason"].lower())
        assert c["median_ms"] is None


def test_comparison_reports_speedup_next_to_the_flop_ratio(configs, report):
    tiny = load_settings(None, configs["tiny"]).model
    wider = load_settings(None, configs["wider"]).model
    expected = {w: vae_flops(wider, 16)[w] / vae_flops(tiny, 16)[w] for w in ("encode", "decode")}
    rows = {(c["what"], c["batch"]): c for c in report["comparisons"]}
    assert set(rows) == {(w, b) for w in ("encode", "decode", "encode+decode") for b in (1, 2)}
    for (what, batch), row in rows.items():
        assert (row["ours"], row["against"]) == ("tiny", "wider")
        if what != "encode+decode":
            assert row["flop_ratio"] == pytest.approx(expected[what])
            ours = next(c for c in report["cases"] if c["key"] == f"tiny/{what}/torch/fp32/16/b{batch}")
            theirs = next(c for c in report["cases"] if c["key"] == f"wider/{what}/torch/fp32/16/b{batch}")
            assert row["speedup"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flop_ratio"])
    both = rows[("encode+decode", 1)]
    assert both["ours_ms"] == pytest.approx(rows[("encode", 1)]["ours_ms"] + rows[("decode", 1)]["ours_ms"])


def test_markdown_summary_has_cases_speedups_and_skips(report):
    text = to_markdown(report)
    assert text.startswith("## zturbo bench")
    assert "| subject | what | backend |" in text
    assert "### Speedup vs FLOP ratio" in text
    assert "| tiny vs wider | encode+decode |" in text
    assert "Not run:" in text
    assert "- skipped: tiny trt fp32 encode,decode at 16 px, batch 1,2: " in text


# ---------------------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("upsample", ["nearest", "subpixel"])
def test_flop_count_of_a_tiny_config_equals_a_hand_count(upsample):
    from zturbo.model.kernels import Kernels

    cfg = ModelConfig(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                      mid_block_add_attention=True, sample_size=16)
    R, r = 16, 8  # image and latent side

    def conv(cin, cout, k, side):
        return 2 * cin * cout * k * k * side * side

    def resnet(cin, cout, side):
        return conv(cin, cout, 3, side) + conv(cout, cout, 3, side) + (conv(cin, cout, 1, side) if cin != cout else 0)

    tokens, c = r * r, 64
    attention = 4 * 2 * tokens * c * c + 2 * (2 * tokens * tokens * c)  # q, k, v, out projections; QK^T and AV
    mid = 2 * resnet(64, 64, r) + attention
    encode = (conv(3, 32, 3, R) + resnet(32, 32, R) + conv(32, 32, 3, r)  # stride-2 conv: output is r x r
              + resnet(32, 64, r) + mid + conv(64, 8, 3, r) + conv(8, 8, 1, r))
    if upsample == "nearest":  # a 3x3 conv over the upsampled R x R map
        upsample_conv = conv(64, 64, 3, R)
    else:  # one 2x2 kernel per output phase (4 x Cout outputs) over the padded r x r map: (r + 1)^2 positions
        upsample_conv = 2 * 64 * (4 * 64) * 2 * 2 * (r + 1) ** 2
    decode = (conv(4, 4, 1, r) + conv(4, 64, 3, r) + mid
              + 2 * resnet(64, 64, r) + upsample_conv  # up block 0: layers+1 resnets, then upsample conv
              + resnet(64, 32, R) + resnet(32, 32, R) + conv(32, 3, 3, R))
    counted = flops_per_image(cfg, R, Kernels(upsample=upsample))
    assert counted["encode"] == encode
    assert counted["decode"] == decode
    # Backward costs about twice the forward; the train count must sit near 3x, and above 2x.
    assert 2 * (encode + decode) < counted["train"] <= 3 * (encode + decode)


# ---------------------------------------------------------------------------------------------------------
# The baseline gate


def test_gate_passes_on_identical_numbers(report):
    verdict = compare_with_baseline(report, copy.deepcopy(report), 0.10)
    assert verdict["passed"] is True
    assert verdict["compared"] == len(ok_cases(report))
    assert verdict["regressed"] == verdict["missing"] == 0


def test_gate_fails_on_a_synthetic_2x_regression(report):
    slower = copy.deepcopy(report)
    for c in slower["cases"]:
        if c["status"] == "ok":
            c["median_ms"] *= 2
    verdict = compare_with_baseline(slower, report, 0.10)
    assert verdict["passed"] is False
    assert verdict["regressed"] == len(ok_cases(report))
    assert all(r["change"] == pytest.approx(1.0) for r in verdict["rows"] if r["verdict"] == "regressed")
    # A 2x slow-down passes only a tolerance above 100%.
    assert compare_with_baseline(slower, report, 1.01)["passed"] is True


def test_gate_fails_when_a_measured_case_no_longer_runs(report):
    lost = copy.deepcopy(report)
    victim = next(c for c in lost["cases"] if c["status"] == "ok")
    victim.update(status="skipped", reason="backend not installed", median_ms=None)
    verdict = compare_with_baseline(lost, report, 0.10)
    assert verdict["passed"] is False and verdict["missing"] == 1
    assert "backend not installed" in next(r for r in verdict["rows"] if r["verdict"] == "missing")["note"]


def test_tolerance_parsing():
    assert parse_tolerance("10%") == pytest.approx(0.10)
    assert parse_tolerance("0.25") == pytest.approx(0.25)
    for bad in ("ten", "-5%", "5000%"):
        with pytest.raises(UsageError):
            parse_tolerance(bad)


# ---------------------------------------------------------------------------------------------------------
# The CLI


def _write_baseline(path, source, factor):
    data = json.loads(source.read_text())
    for c in data["cases"]:
        if c["status"] == "ok":
            c["median_ms"] *= factor
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_cli_writes_json_and_markdown_and_gates(configs, capsys):
    root = configs["root"]
    args = ["bench", "-c", str(configs["tiny"]), "--device", "cpu", "--resolutions", "16", "--batch-sizes", "1",
            "--what", "decode", "--repeats", "1", "--warmup", "1", "--quiet"]
    first = root / "first.json"
    assert run([*args, "--json", str(first), "--markdown", str(root / "first.md")]) == 0
    out = capsys.readouterr().out
    assert "zturbo bench" in out and "decode" in out
    data = json.loads(first.read_text())
    assert data["complete"] and [c["key"] for c in data["cases"]] == ["fast/decode/torch/fp32/16/b1"]
    assert (root / "first.md").read_text().startswith("## zturbo bench")

    # A baseline 100x slower than now passes; one 100x faster is a regression: exit 1 and one line.
    _write_baseline(root / "slow.json", first, 100.0)
    assert run([*args, "--baseline", str(root / "slow.json"), "--max-regression", "10%"]) == 0
    capsys.readouterr()
    _write_baseline(root / "fast.json", first, 0.01)
    second = root / "second.json"
    rc = run([*args, "--baseline", str(root / "fast.json"), "--max-regression", "10%", "--json", str(second)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "benchmark regression" in err and "1 case(s) slower" in err
    gate = json.loads(second.read_text())["gate"]
    assert gate["passed"] is False and gate["rows"][0]["verdict"] == "regressed"


@pytest.mark.slow
def test_cli_json_to_stdout_and_usage_errors(configs, capsys):
    args = ["bench", "-c", str(configs["tiny"]), "--device", "cpu", "--resolutions", "16", "--batch-sizes", "1",
            "--what", "encode", "--repeats", "1", "--warmup", "0", "--quiet"]
    assert run([*args, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cases"][0]["status"] == "ok"
    assert run([*args, "--max-regression", "lots"]) == 2
    assert "--max-regression" in capsys.readouterr().err
    assert run([*args, "--resolutions", "15"]) == 2
    assert "not divisible by 2" in capsys.readouterr().err
    assert run([*args, "--backend", "tpu"]) == 2
    assert run([*args, "--baseline", str(configs["root"] / "missing.json")]) == 2


# ---------------------------------------------------------------------------------------------------------
# Plans, train case, diffusers


def test_cpu_plan_fills_only_unset_fields_from_the_cpu_defaults(configs):
    plan = make_plan(load_settings(None, configs["tiny"], {"bench": {"device": "cpu"}}))
    defaults = (CPU_DEFAULTS["resolutions"], CPU_DEFAULTS["batch_sizes"], CPU_DEFAULTS["repeats"])
    assert (plan.resolutions, plan.batch_sizes, plan.repeats) == defaults
    assert plan.peak_dtype == "fp32"
    given = make_plan(load_settings(None, configs["tiny"], {"bench": {"device": "cpu", "resolutions": [64],
                                                                      "repeats": 1}}))
    assert (given.resolutions, given.batch_sizes, given.repeats) == ([64], CPU_DEFAULTS["batch_sizes"], 1)


def test_train_case_times_the_training_step(configs, monkeypatch):
    import zturbo.bench.train_case

    seen = {}

    def fake_benchmark_step(settings, device, *, steps, warmup):
        seen.update(size=settings.data.image_size, batch=settings.train.batch_size, steps=steps, warmup=warmup)
        samples = [30.0 + i for i in range(steps)]
        return {"step_ms": 30.5, "step_ms_all": samples, "images_per_s": 2 / 0.0305, "peak_memory_gib": 0.5,
                "micro_batch": 1}

    monkeypatch.setattr(zturbo.bench.train_case, "benchmark_step", fake_benchmark_step)
    report = run_bench(tiny_settings(configs, what=["train"]), profile_name="tiny")
    (case,) = report["cases"]
    assert seen == {"size": 16, "batch": 2, "steps": REPEATS, "warmup": 1}
    assert case["status"] == "ok" and case["batch"] == 2 and case["micro_batch"] == 1
    assert case["median_ms"] == 30.5 and case["samples_ms"] == [30.0, 31.0]
    assert case["images_per_s"] == pytest.approx(2 / 0.0305)
    assert case["peak_memory_mb"] == pytest.approx(512) and case["memory_kind"] == "process_peak_rss"
    assert case["flops_per_image"] == flops_per_image(load_settings(None, configs["tiny"]).model, 16)["train"]
    validate_report(report)


def test_train_hook_offers_what_the_train_case_calls():
    # The real step is covered by the training tests; here only the contract the train case relies on.
    import inspect

    from zturbo.train import benchmark_step

    params = inspect.signature(benchmark_step).parameters
    assert list(params)[:2] == ["settings", "device"]
    assert {"steps", "warmup"} <= set(params)


@pytest.mark.slow
def test_against_diffusers_uses_the_same_config_and_weights(configs, monkeypatch):
    pytest.importorskip("diffusers", reason="--against diffusers needs diffusers")
    from zturbo.bench import cases

    class TextbookVAE(cases.VAE):  # our model computing its upsampling as diffusers does
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.set_kernels(upsample="nearest")

    settings = tiny_settings(configs, what=["decode"], batch_sizes=[1], backends=["torch", "trt"], against="diffusers")
    with monkeypatch.context() as patch:
        patch.setattr(cases, "VAE", TextbookVAE)
        (textbook,) = run_bench(settings, profile_name="tiny")["comparisons"]
    assert textbook["flop_ratio"] == pytest.approx(1.0)  # same architecture and ops, counted independently
    report = run_bench(settings, profile_name="tiny")
    (row,) = report["comparisons"]
    assert row["against"] == "diffusers"
    assert row["flop_ratio"] > 1.0  # the same function; the per-phase upsample conv does fewer multiply-adds
    assert row["speedup"] > 0
    skipped = next(c for c in report["cases"] if c["subject"] == "diffusers" and c["backend"] == "trt")
    assert skipped["status"] == "skipped" and "torch and compile" in skipped["reason"]


def test_percentile_matches_linear_interpolation():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile([7.0], 90) == 7.0


def test_rounds_pass_their_index_and_alternate_the_order():
    calls = []
    fns = [lambda i: calls.append(("a", i)), lambda i: calls.append(("b", i))]
    timings = time_rounds(fns, torch.device("cpu"), rounds=3, alternate=True)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert [len(t.samples_ms) for t in timings] == [3, 3]


def test_sync_is_waited_for_inside_the_timed_span():
    """Work a call only queues (here a thread sleeping 50 ms) counts once ``sync`` waits for it."""
    events, pending = [], []

    def queue_work():
        events.append("call")
        pending.append(threading.Thread(target=time.sleep, args=(0.05,)))
        pending[-1].start()

    def sync():
        events.append("sync")
        while pending:
            pending.pop().join()

    (timing,) = time_interleaved([queue_work], torch.device("cpu"), warmup=1, repeats=2, sync=sync)
    assert events == ["call", "sync", "sync", "call", "sync", "sync", "call", "sync"]
    assert timing.min_ms >= 50.0  # sleep() sleeps at least as long as asked


@pytest.mark.slow
def test_saved_model_is_benchmarked_under_its_folder_name(configs, tmp_path):
    from zturbo.model import VAE

    cfg = ModelConfig(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, sample_size=16,
                      mid_block_add_attention=False)
    VAE(cfg).save_pretrained(tmp_path / "my-vae")
    settings = tiny_settings(configs, what=["decode"], batch_sizes=[1])
    report = run_bench(settings, model_path=tmp_path / "my-vae")
    (case,) = report["cases"]
    assert case["key"] == "my-vae/decode/torch/fp32/16/b1" and case["status"] == "ok"
    assert report["subjects"][0]["config"]["block_out_channels"] == [32, 32]
    assert case["flops_per_image"] == vae_flops(cfg, 16)["decode"]


@pytest.mark.gpu
def test_gpu_bench_uses_cuda_memory_and_the_bf16_matmul_peak(configs):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    settings = tiny_settings(configs, device="cuda", precision="bf16", channels_last=True, batch_sizes=[2],
                             peak_matmul_size=4096, against="diffusers")
    report = run_bench(settings, profile_name="tiny")
    assert report["peak"]["dtype"] == "bfloat16" and report["peak"]["tflops"] > 1
    assert report["environment"]["gpus"]
    for case in report["cases"]:
        assert case["status"] == "ok", case["reason"]
        assert case["memory_kind"] == "cuda_max_allocated" and case["peak_memory_mb"] > 0
        assert 0 < case["mfu"] < 1
