"""Every artifact kind with every command: runs, or is refused in one line naming both kinds.

The artifacts are tiny (a two-level VAE, 32 px images). The ONNX export is real and
takes the torch exporter tens of seconds on two busy cores, so its rows are marked
slow. A TensorRT export cannot be built here (no TensorRT, no GPU): its rows use a
folder with the metadata of one (``format: trt``) beside placeholder graph and
engine files, which is enough for detection and refusal but never runs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from zturbo.artifacts import Kind, NotAnArtifact, load_vae, resolve
from zturbo.cli import run
from zturbo.export.layout import FORMAT_VERSION, META_NAME
from zturbo.export.single_file import export_single_file
from zturbo.model import VAE, ModelConfig

pytest.importorskip("onnxruntime")
# torch's ONNX exporter needs onnxscript; looked up, not imported (its import takes seconds and the
# exporter imports it when a test exports).
if importlib.util.find_spec("onnxscript") is None:
    pytest.skip("torch's ONNX exporter needs onnxscript", allow_module_level=True)

TINY = ModelConfig(
    block_out_channels=[8, 16],
    norm_num_groups=4,
    layers_per_block=1,
    latent_channels=4,
    sample_size=32,
    mid_block_add_attention=False,
)
TORCH = ("model", "run", "step", "diffusers", "pipeline", "single")


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    vae = VAE(TINY)
    paths = {"model": root / "model"}
    vae.save_pretrained(paths["model"])
    step = root / "run" / "checkpoints" / "step-2"
    for sub in ("model", "ema"):
        shutil.copytree(paths["model"], step / sub)
    shutil.copytree(paths["model"], root / "run" / "final")
    paths.update(run=root / "run", step=step)
    paths["diffusers"] = root / "diffusers"
    shutil.copytree(paths["model"], paths["diffusers"])
    config = json.loads((paths["diffusers"] / "config.json").read_text())
    del config["_zturbo_version"]  # what diffusers itself writes
    (paths["diffusers"] / "config.json").write_text(json.dumps(config))
    paths["pipeline"] = root / "pipeline"
    shutil.copytree(paths["diffusers"], paths["pipeline"] / "vae")
    (paths["pipeline"] / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    paths["single"] = root / "vae.safetensors"  # a shape no other tool builds: written with force
    export_single_file(vae, paths["single"], force=True)
    # Metadata of a TensorRT export beside placeholder files (detection and refusal only, see the docstring).
    paths["trt"] = root / "trt"
    paths["trt"].mkdir()
    parts = {}
    for part, (inp, out) in {"encoder": ("image", "latent"), "decoder": ("latent", "image")}.items():
        for suffix in ("onnx", "plan"):
            (paths["trt"] / f"{part}.{suffix}").write_bytes(b"placeholder")
        parts[part] = {"onnx": f"{part}.onnx", "plan": f"{part}.plan", "input": inp, "output": out}
    meta = {
        "format_version": FORMAT_VERSION,
        "format": "trt",
        "model": TINY.model_dump(mode="json"),
        "parts": parts,
    }
    (paths["trt"] / META_NAME).write_text(json.dumps(meta))
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    paths["file"] = root / "notes.txt"
    paths["file"].write_text("not a model")
    paths["images"] = root / "images"
    paths["images"].mkdir()
    for i in range(2):
        Image.new("RGB", (40, 36), (60 * i, 100, 200)).save(paths["images"] / f"{i}.png")
    paths["missing"] = root / "missing"
    return paths


@pytest.fixture(scope="module")
def onnx_export(arts) -> Path:
    out = arts["model"].parent / "onnx"
    assert run(["export", str(arts["model"]), "--out", str(out), "--size", "32:32:64", "-q"]) == 0
    return out


@pytest.fixture
def path_of(arts, request):
    """The path of an artifact by name; the ONNX export is built on first use (slow)."""
    return lambda name: request.getfixturevalue("onnx_export") if name == "onnx" else arts[name]


def _rows(rows):
    """Parameter rows; slow: the ones needing the real ONNX export, and bench beyond one torch kind
    (each bench run measures a matmul peak and probes the environment; the other torch kinds
    resolve as the eval, export and serve-batch rows show)."""
    rows = [row if isinstance(row, tuple) else (row,) for row in rows]
    slow = [row for row in rows if "onnx" in row or (row[0] == "bench" and row[1] != "model")]
    return [pytest.param(*row, marks=pytest.mark.slow) if row in slow else pytest.param(*row) for row in rows]


KINDS = {
    "model": Kind.MODEL,
    "run": Kind.RUN,
    "step": Kind.STEP,
    "diffusers": Kind.DIFFUSERS,
    "pipeline": Kind.PIPELINE,
    "single": Kind.SINGLE_FILE,
    "onnx": Kind.ONNX,
    "trt": Kind.TRT,
}
FOUND = {
    "empty": "is an empty folder",
    "file": "is a file (.txt), not a model",
    "images": "is a folder of 2 images, not a model",
    "missing": "is not there",
}


@pytest.mark.parametrize("name", _rows(list(KINDS)))
def test_resolve_names_each_kind(path_of, name):
    artifact = resolve(path_of(name))
    assert artifact.kind is KINDS[name]
    if name == "single":
        assert artifact.model_dir is None and artifact.source == artifact.root and artifact.backend == "torch"
    elif name in TORCH:
        assert (artifact.model_dir / "config.json").is_file() and artifact.backend == "torch"
    else:
        assert artifact.export_meta["format"] == name and artifact.backend == name


def test_model_dirs_are_the_weights_to_load(arts):
    assert resolve(arts["run"]).model_dir == arts["run"] / "final"
    assert resolve(arts["step"]).model_dir == arts["step"] / "ema"
    assert resolve(arts["pipeline"]).model_dir == arts["pipeline"] / "vae"
    assert resolve(arts["trt"] / "decoder.onnx").root == arts["trt"]  # one graph names its export
    reference = load_vae(arts["model"]).state_dict()
    for name in TORCH:
        loaded = load_vae(arts[name]).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.items()), name


@pytest.mark.parametrize("name", list(FOUND))
def test_what_is_no_artifact_is_described(arts, name):
    with pytest.raises(NotAnArtifact) as info:
        resolve(arts[name])
    assert FOUND[name] in info.value.message and "\n" not in info.value.message


def _eval(path: Path, arts) -> list[str]:
    return [
        "eval",
        str(path),
        "--data",
        str(arts["images"]),
        "--size",
        "32",
        "--metrics",
        "psnr",
        "--json",
        "-q",
    ]


def _bench(path: Path, arts) -> list[str]:
    return [
        "bench",
        "--model",
        str(path),
        "--resolutions",
        "32",
        "--batch-sizes",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--what",
        "decode",
        "--json",
        "-",
        "-q",
    ]


def _export(path: Path, arts) -> list[str]:
    return [
        "export",
        str(path),
        "--format",
        "diffusers",
        "--out",
        str(arts["empty"].parent / "out" / path.name),
        "--json",
        "-q",
    ]


def _import(path: Path, arts) -> list[str]:
    return ["import", str(path), "--out", str(arts["empty"].parent / "imported" / path.name), "-q"]


def _import_old_name(path: Path, arts) -> list[str]:
    return ["import-diffusers", str(path), "--out", str(arts["empty"].parent / "imported-old" / path.name), "-q"]


def _resume(path: Path, arts) -> list[str]:
    return ["train", "--profile", "demo", "--resume", str(path), "--dry-run", "--json"]


def _serve(path: Path, arts) -> list[str]:
    out = arts["empty"].parent / "served" / path.name
    return [
        "serve-batch",
        "encode",
        str(path),
        "--input",
        str(arts["images"]),
        "--output",
        str(out),
        "--size",
        "32",
        "--batch-size",
        "2",
        "--json",
        "-q",
    ]


COMMANDS = {
    "eval": (_eval, "eval", TORCH + ("onnx",)),
    "bench": (_bench, "bench --model", TORCH + ("onnx",)),
    "export": (_export, "export", TORCH),
    "import": (_import, "import", TORCH),
    "import-diffusers": (_import_old_name, "import", ("model", "single")),
    "train --resume": (_resume, "train --resume", ("run", "step")),
    "serve-batch": (_serve, "serve-batch", TORCH + ("onnx",)),
}
TORCH_PHRASE = ("a model folder, a run folder, a step-N checkpoint, a diffusers folder, a diffusers pipeline folder "
                "or a single .safetensors file")
ACCEPTS = {
    "eval": "a model folder, a run folder, a step-N checkpoint, a diffusers folder, a diffusers pipeline folder, "
    "a single .safetensors file, an ONNX export or a TensorRT export",
    "export": TORCH_PHRASE,
    "import": TORCH_PHRASE,
    "import-diffusers": TORCH_PHRASE,
    "train --resume": "a run folder or a step-N checkpoint",
}
# Kinds each command refuses, by what the refusal names.
REFUSED = [
    ("export", "onnx"),
    ("export", "trt"),
    ("import", "onnx"),
    ("import-diffusers", "trt"),
    ("train --resume", "model"),
    ("train --resume", "diffusers"),
    ("train --resume", "single"),
    ("train --resume", "onnx"),
    ("train --resume", "trt"),
]
# A runnable kind per command: the full job runs (tiny sizes) and exits 0.
WORKS = [(command, kind) for command, (_, _, kinds) in COMMANDS.items() for kind in kinds]


@pytest.mark.parametrize(("command", "kind"), _rows(WORKS))
def test_command_runs_on_the_kinds_its_job_can_use(arts, path_of, capsys, monkeypatch, command, kind):
    monkeypatch.setenv("ZTURBO_BENCH__PEAK_MATMUL_SIZE", "64")  # bench's matmul peak: a tiny one will do here
    argv, _, _ = COMMANDS[command]
    rc = run(argv(path_of(kind), arts))
    err = capsys.readouterr().err
    assert rc == 0, err


@pytest.mark.parametrize(("command", "kind"), _rows(REFUSED))
def test_command_refuses_other_kinds_in_one_line(arts, path_of, capsys, command, kind):
    argv, job, _ = COMMANDS[command]
    rc = run(argv(path_of(kind), arts))
    err = capsys.readouterr().err
    expected = f"{path_of(kind)} is {KINDS[kind].phrase}; {job} needs {ACCEPTS[command]}"
    assert rc == 2 and expected in " ".join(err.split()), err


@pytest.mark.parametrize("command", ["eval", "export", "train --resume"])
@pytest.mark.parametrize("name", ["empty", "images"])
def test_command_says_what_it_found_where_no_artifact_is(arts, capsys, command, name):
    argv, job, _ = COMMANDS[command]
    rc = run(argv(arts[name], arts))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and f"{arts[name]} {FOUND[name]}; {job} needs {ACCEPTS[command]}" in err, err


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_an_export_refuses_a_torch_backend_asked_for_by_name(arts, capsys, command):
    argv, job, _ = COMMANDS[command]
    rc = run([*argv(arts["trt"], arts), "--backend", "torch"])
    err = " ".join(capsys.readouterr().err.split())
    assert (
        rc == 2
        and f"{arts['trt']} is a TensorRT export; {job.split()[0]} with the torch backend needs" in err
    ), err


def test_a_tensorrt_export_picks_the_trt_backend(arts, capsys):
    # No TensorRT here: reaching the TensorRT backend shows as its missing-package message.
    rc = run(_eval(arts["trt"], arts))
    err = capsys.readouterr().err
    assert rc != 0 and "tensorrt" in err.lower(), err
