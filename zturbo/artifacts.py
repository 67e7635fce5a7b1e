"""What a path is: the one place that decides what a model path given to any command means.

    artifact = resolve("runs/demo")          # Artifact(kind=Kind.RUN, root=..., model_dir=runs/demo/final)
    artifact = require("out/onnx", TORCH_KINDS, "export")   # "out/onnx is an ONNX export; export needs ..."
    vae = load_vae("runs/demo")
    vae = load_vae("ae.safetensors", latent_family="flux1")

The kinds, told apart by their contents (never by name alone):

- model folder: ``config.json`` with a ``_zturbo_version`` key (every folder our
  ``save_pretrained`` writes has it) next to its weights;
- diffusers folder: an AutoencoderKL ``config.json`` without that key (written by
  diffusers itself) next to its weights;
- diffusers pipeline folder: no ``config.json`` of its own, the VAE in ``vae/``;
- run folder: ``final/`` or ``checkpoints/step-N/`` (the training run layout);
- step-N checkpoint: ``ema/`` and/or ``model/`` model folders (the EMA weights are
  the ones loaded);
- ONNX export / TensorRT export: ``zturbo_export.json`` (its ``format`` says which;
  a TensorRT export also holds the ONNX graphs it was built from);
- single .safetensors file: a VAE in one file, in any layout ``zturbo.model.single_file``
  reads (LDM/BFL, BFL FLUX.2, diffusers names, the VAE of a full checkpoint); a pickle
  (.ckpt, .pt) is refused unread.

The torch kinds hold a model folder to load (``model_dir``) or a resolved single file
(``single_file``: its architecture and latent factors, read from its header); the
exports hold their metadata (``export_meta``). It sits above train and export (it knows both layouts)
and below backends, which open an artifact with the engine that fits it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from zturbo.data import IMAGE_EXTENSIONS
from zturbo.errors import CheckpointError
from zturbo.export.layout import META_NAME, read_export_meta
from zturbo.model import VAE, load_pretrained
from zturbo.model.diffusers import CONFIG_NAME, FLUX2_CLASS, read_config, weight_files
from zturbo.model.safetensors_header import pickle_refusal, sniff
from zturbo.model.single_file import SingleFile, open_single_file
from zturbo.train.layout import CHECKPOINTS_DIR, FINAL_DIR, latest_checkpoint

ZTURBO_MARKER = "_zturbo_version"
PIPELINE_VAE_DIR = "vae"
_GRAPH_SUFFIXES = (".onnx", ".plan")


class Kind(str, Enum):
    MODEL = "model folder"
    RUN = "run folder"
    STEP = "step-N checkpoint"
    DIFFUSERS = "diffusers folder"
    PIPELINE = "diffusers pipeline folder"
    ONNX = "ONNX export"
    TRT = "TensorRT export"
    SINGLE_FILE = "single .safetensors file"

    @property
    def phrase(self) -> str:
        """The kind with its article: 'a run folder', 'an ONNX export'."""
        return f"{'an' if self.value[0] in 'AEIOU' else 'a'} {self.value}"


TORCH_KINDS = (Kind.MODEL, Kind.RUN, Kind.STEP, Kind.DIFFUSERS, Kind.PIPELINE, Kind.SINGLE_FILE)
EXPORT_KINDS = (Kind.ONNX, Kind.TRT)
ALL_KINDS = TORCH_KINDS + EXPORT_KINDS
RESUME_KINDS = (Kind.RUN, Kind.STEP)


@dataclass(frozen=True)
class Artifact:
    """A resolved path. ``root``: the artifact's folder or file (a graph file given resolves to its export).

    ``model_dir``: for torch folder kinds, the folder with ``config.json`` + weights that
    loads (a run's ``final/`` or its newest EMA weights, a step's ``ema/``, a
    pipeline's ``vae/``). ``single_file``: for a single file, what it holds and where its
    latent factors come from (``note``). ``export_meta``: for exports, the parsed metadata.

    An artifact stands for its path wherever one is taken (``os.fspath``, ``str``), so a
    command can resolve a path once (with ``--latent-family``) and hand the result down.
    """

    kind: Kind
    root: Path
    model_dir: Path | None = None
    export_meta: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    single_file: SingleFile | None = field(default=None, compare=False, repr=False)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def source(self) -> Path:
        """Where the weights that load are: the model folder, or the single file."""
        return self.model_dir if self.model_dir is not None else self.root

    @property
    def is_export(self) -> bool:
        return self.kind in EXPORT_KINDS

    @property
    def backend(self) -> str:
        """The backend that runs this artifact as it is: torch, onnx or trt."""
        return {Kind.ONNX: "onnx", Kind.TRT: "trt"}.get(self.kind, "torch")

    def load_vae(self, map_location: str | torch.device = "cpu") -> VAE:
        if self.single_file is not None:
            return self.single_file.load(map_location)
        if self.model_dir is None:
            raise CheckpointError(
                f"{self.root} is {self.kind.phrase}; loading a torch model needs {phrase(TORCH_KINDS)}"
            )
        return load_pretrained(self.model_dir, map_location=map_location)


def phrase(kinds: Iterable[Kind]) -> str:
    """'a run folder or a step-N checkpoint'."""
    parts = [k.phrase for k in kinds]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


class NotAnArtifact(CheckpointError):
    """A path that is none of the kinds; ``found`` says what it is ('an empty folder', 'a file')."""

    def __init__(self, path: Path, found: str, expected: Iterable[Kind] = ALL_KINDS, job: str | None = None):
        self.path, self.found = path, found
        super().__init__(_refusal(path, found, expected, job))


def _refusal(path: Path, found: str, expected: Iterable[Kind], job: str | None) -> str:
    return f"{path} is {found}; {job or 'zturbo'} needs {phrase(expected)}"


def resolve(path: str | os.PathLike, latent_family: str | None = None) -> Artifact:
    """The artifact at ``path``; NotAnArtifact (one line: what is there, what was expected) otherwise.

    A corrupt ``config.json`` or export metadata, a truncated, pickled or unknown single
    file raise CheckpointError naming the file. ``latent_family`` picks a single file's
    latent factors where its shapes fit several families (``zturbo.model.single_file``).
    """
    path = Path(path)
    if not path.exists():
        raise NotAnArtifact(path, "not there (no such file or folder)")
    if path.is_file():
        return _resolve_file(path, latent_family)
    if (path / META_NAME).is_file():
        meta = read_export_meta(path)
        kind = Kind.TRT if meta.get("format") == "trt" else Kind.ONNX
        return Artifact(kind, path, export_meta=meta)
    if (path / CONFIG_NAME).is_file():
        return Artifact(_model_kind(path), path, model_dir=path)
    if (path / PIPELINE_VAE_DIR / CONFIG_NAME).is_file():
        _model_kind(path / PIPELINE_VAE_DIR)  # refuses a vae/ that is no AutoencoderKL with weights
        return Artifact(Kind.PIPELINE, path, model_dir=path / PIPELINE_VAE_DIR)
    step_model = _step_model(path)
    if step_model is not None:
        return Artifact(Kind.STEP, path, model_dir=step_model)
    if (path / FINAL_DIR / CONFIG_NAME).is_file():
        return Artifact(Kind.RUN, path, model_dir=path / FINAL_DIR)
    latest = latest_checkpoint(path / CHECKPOINTS_DIR)
    if latest is not None and _step_model(latest) is not None:
        return Artifact(Kind.RUN, path, model_dir=_step_model(latest))
    raise NotAnArtifact(path, _describe_folder(path))


def require(
    path: str | os.PathLike | Artifact, accepted: Iterable[Kind], job: str, latent_family: str | None = None
) -> Artifact:
    """``resolve(path)`` (or the Artifact given) when ``job`` accepts its kind; else one line naming both."""
    accepted = tuple(accepted)
    if isinstance(path, Artifact):
        artifact = path
    else:
        try:
            artifact = resolve(path, latent_family)
        except NotAnArtifact as exc:
            raise NotAnArtifact(exc.path, exc.found, accepted, job) from None
    if artifact.kind not in accepted:
        raise CheckpointError(_refusal(artifact.root, artifact.kind.phrase, accepted, job))
    return artifact


def load_vae(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", latent_family: str | None = None
) -> VAE:
    """A VAE from a model, run, step-N, diffusers or diffusers pipeline folder, or a single .safetensors file."""
    return require(path, TORCH_KINDS, "load_vae", latent_family).load_vae(map_location)


def _resolve_file(path: Path, latent_family: str | None) -> Artifact:
    if path.suffix.lower() in _GRAPH_SUFFIXES:
        if (path.parent / META_NAME).is_file():
            return resolve(path.parent)  # one graph of an export: the backends need the whole folder
        raise NotAnArtifact(path, f"a lone {path.suffix} graph file (no {META_NAME} beside it)")
    found = sniff(path)
    if found == "pickle":
        raise pickle_refusal(path)
    if found == "safetensors":
        return Artifact(Kind.SINGLE_FILE, path, single_file=open_single_file(path, latent_family))
    raise NotAnArtifact(path, f"a file ({path.suffix or 'no extension'}), not a model")


def _model_kind(folder: Path) -> Kind:
    """MODEL or DIFFUSERS for a folder with config.json, once seen to hold an AutoencoderKL with weights."""
    config = read_config(folder)
    cls_name = config.get("_class_name", "AutoencoderKL")
    if cls_name not in ("AutoencoderKL", FLUX2_CLASS):
        raise NotAnArtifact(
            folder, f"a folder whose {CONFIG_NAME} describes a '{cls_name}', not an AutoencoderKL or {FLUX2_CLASS}"
        )
    try:
        weight_files(folder)
    except CheckpointError:
        raise NotAnArtifact(folder, f"a model {CONFIG_NAME} without weights") from None
    return Kind.MODEL if ZTURBO_MARKER in config else Kind.DIFFUSERS


def _step_model(folder: Path) -> Path | None:
    """The weights a step-N checkpoint folder loads: its EMA, else its raw model."""
    for sub in ("ema", "model"):
        if (folder / sub / CONFIG_NAME).is_file():
            return folder / sub
    return None


def _describe_folder(path: Path) -> str:
    """What an unrecognised folder holds, in a few words."""
    try:
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        return f"an unreadable folder ({exc.strerror or exc})"
    if not entries:
        return "an empty folder"
    if any(p.suffix.lower() in _GRAPH_SUFFIXES for p in entries):
        return f"an incomplete export (graph files but no {META_NAME}: interrupted?)"
    if (path / CHECKPOINTS_DIR).is_dir():
        return "a run folder with no finished model and no complete checkpoint yet"
    images = sum(1 for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if images:
        return f"a folder of {images} image{'s' if images != 1 else ''}, not a model"
    files = sum(1 for p in entries if p.is_file())
    folders = len(entries) - files
    markers = f"{CONFIG_NAME}, final/, checkpoints/ or {META_NAME}"
    return f"a folder of {files} file(s) and {folders} folder(s) with no {markers}"
