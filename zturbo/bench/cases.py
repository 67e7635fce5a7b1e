"""What is benchmarked: subjects (our model, a baseline config, diffusers' AutoencoderKL or AutoencoderTiny)
and their engines.

A *subject* is a model architecture with weights in host memory; an *engine*
is that subject made runnable on one backend, device and precision, exposing
``encode(images)`` and ``decode(latents)``. Engines for our VAE come from
``zturbo.backends.create_backend``; diffusers' AutoencoderKL gets a small engine
here, eager or ``torch.compile``'d, with the same weights, inputs and precision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from zturbo.artifacts import ALL_KINDS, Artifact, require
from zturbo.backends import available_backends, create_backend
from zturbo.backends.torch_backend import TorchBackend
from zturbo.config import load_settings
from zturbo.errors import MissingDependencyError, UsageError, ZTurboError
from zturbo.model import ModelConfig, TinyConfig, build_model, parse_model_config
from zturbo.model.diffusers import config_to_diffusers
from zturbo.utils import resolve_dtype

SubjectKind = Literal["zturbo", "diffusers"]


@dataclass
class Subject:
    """A model to time. ``name`` is the stable key used in reports and by the baseline gate.

    ``artifact``: where an exported subject's graphs are; its ``model`` then only
    describes the architecture (parameters on the meta device, no weights).
    """

    name: str
    role: Literal["ours", "against"]
    kind: SubjectKind
    config: ModelConfig | TinyConfig
    model: torch.nn.Module
    artifact: Artifact | None = None

    @property
    def backend(self) -> str:
        """The backend ``auto`` means for this subject: the one its artifact needs, else torch."""
        return self.artifact.backend if self.artifact is not None else "torch"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "kind": self.kind,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "config": self.config.model_dump(mode="json"),
        }


class SkipCase(Exception):
    """A case that cannot run here; the message is the reason shown to the user."""


def our_subject(config: ModelConfig | TinyConfig, name: str, model_path: Path | None = None) -> Subject:
    """Our VAE: the artifact at ``model_path`` when given, else randomly initialised (timing needs no training)."""
    if model_path is None:
        torch.manual_seed(0)
        return Subject(name=name, role="ours", kind="zturbo", config=config, model=build_model(config).eval())
    artifact = require(model_path, ALL_KINDS, "bench --model")
    if artifact.is_export:
        config = parse_model_config(artifact.export_meta["model"])
        with torch.device("meta"):
            shape_only = build_model(config)
        return Subject(name=name, role="ours", kind="zturbo", config=config, model=shape_only, artifact=artifact)
    vae = artifact.load_vae()
    return Subject(name=name, role="ours", kind="zturbo", config=vae.config, model=vae.eval(), artifact=artifact)


def against_subject(against: str, ours: Subject) -> Subject:
    """The comparison subject: 'diffusers' (same config), or a profile name / config file path."""
    if against == "diffusers":
        return diffusers_subject(ours)
    settings = load_settings(against, default_profile=None)
    name = Path(against).stem if Path(against).suffix else against
    if name == ours.name:
        raise UsageError(f"--against {against} compares the profile with itself", "choose another profile or diffusers")
    torch.manual_seed(1)
    return Subject(name=name, role="against", kind="zturbo", config=settings.model,
                   model=build_model(settings.model).eval())


def diffusers_config(config: ModelConfig) -> dict[str, Any]:
    """diffusers AutoencoderKL constructor arguments for the same architecture."""
    n = len(config.block_out_channels)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.sample_size,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
    }


def build_diffusers_model(config: ModelConfig | TinyConfig) -> torch.nn.Module:
    diffusers = _import_diffusers()
    if isinstance(config, TinyConfig):  # its config.json's public keys are AutoencoderTiny's arguments
        return diffusers.AutoencoderTiny(**{k: v for k, v in config_to_diffusers(config).items()
                                            if not k.startswith("_")})
    kwargs = diffusers_config(config)
    if config.decoder_channels == config.block_out_channels and config.patch_size is None:
        return diffusers.AutoencoderKL(**kwargs)
    # Other decoder widths (or FLUX.2's normaliser): AutoencoderKLFlux2 holds them. Its BatchNorm
    # has buffers only and takes no part in encode / decode, so the computation is the same.
    del kwargs["scaling_factor"], kwargs["shift_factor"]
    flux2 = {"patch_size": tuple(config.patch_size or (2, 2)), "batch_norm_eps": config.batch_norm_eps}
    return diffusers.AutoencoderKLFlux2(**kwargs, **flux2, decoder_block_out_channels=config.decoder_channels)


def diffusers_subject(ours: Subject) -> Subject:
    """diffusers' model with our config and our weights (strict load: same keys, same shapes)."""
    if ours.artifact is not None and ours.artifact.is_export:
        raise UsageError(
            f"{ours.artifact.root} is {ours.artifact.kind.phrase}; bench --against diffusers needs our torch weights",
            "give --model the model or run folder the export was made from",
        )
    model = build_diffusers_model(ours.config)
    # AutoencoderKLFlux2's BatchNorm buffers, where our model (an AutoencoderKL) has none, stay its own.
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.startswith("bn.")},
                           **ours.model.state_dict()}, strict=True)
    return Subject(name="diffusers", role="against", kind="diffusers", config=ours.config, model=model.eval())


def diffusers_latent(encoded: Any) -> torch.Tensor:
    """The latent of a diffusers model's ``encode`` output: AutoencoderTiny's ``latents``, else the posterior mean."""
    return encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean


def _import_diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise MissingDependencyError("diffusers", "--against diffusers", extra="dev") from exc
    return diffusers


# ---------------------------------------------------------------------------------------------------------
# Engines


class DiffusersEngine(TorchBackend):
    """diffusers' AutoencoderKL (or AutoencoderTiny) on one device and precision, eager or compiled like our backends."""

    name = "diffusers"

    def _encode_impl(self, x: torch.Tensor) -> torch.Tensor:
        return diffusers_latent(self.vae.encode(x))

    def _decode_impl(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def build_engine(subject: Subject, backend: str, device: torch.device, precision: str, channels_last: bool,
                 tiling: dict[str, Any] | None = None):
    """An engine for ``subject`` on ``backend``; raises SkipCase with the reason when it cannot be built.

    ``tiling`` (backend options for tiled passes) applies to our model on the torch backend only.
    """
    if subject.kind == "diffusers":
        if backend not in ("torch", "compile"):
            raise SkipCase(f"diffusers is timed on the torch and compile backends only, not '{backend}'")
        if tiling:
            raise SkipCase("diffusers' model is timed untiled; --tile times ours only")
        model = copy.deepcopy(subject.model)
        return DiffusersEngine(model, device, resolve_dtype(precision), channels_last=channels_last,
                               compiled=backend == "compile", config=subject.config)
    if backend not in available_backends():
        raise SkipCase(
            f"backend '{backend}' is not available in this installation (have: {', '.join(available_backends())})"
        )
    options: dict[str, Any] = {"device": device, "precision": precision}
    if backend in ("torch", "compile"):
        options["channels_last"] = channels_last  # what the case says, not the backend's own default
    if tiling:
        if backend != "torch":
            raise SkipCase(f"--tile runs on the torch backend only, not '{backend}'")
        options.update(tiling)
    elif channels_last:
        options["channels_last"] = True
    exported = subject.artifact is not None and subject.artifact.is_export
    try:
        if exported:
            return create_backend(backend, subject.artifact, **options)
        return create_backend(backend, copy.deepcopy(subject.model), **options)
    except MissingDependencyError as exc:
        raise SkipCase(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from exc
    except ZTurboError as exc:
        raise SkipCase(exc.message) from exc
    except (ImportError, RuntimeError, NotImplementedError, ValueError, TypeError, OSError) as exc:
        raise SkipCase(f"backend '{backend}' could not be built here: {type(exc).__name__}: {_first_line(exc)}") \
            from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def skip_reason(exc: BaseException, batch: int) -> tuple[str, str]:
    """(status, reason) for an exception raised while running a case."""
    if isinstance(exc, SkipCase):
        return "skipped", str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "skipped", f"out of device memory at batch {batch}"
    if isinstance(exc, MemoryError):
        return "skipped", f"out of host memory at batch {batch}"
    if isinstance(exc, ZTurboError):
        return "skipped", exc.message
    message = _first_line(exc)
    if type(exc).__name__ in ("BackendCompilerFailed", "InductorError"):
        return "skipped", f"torch.compile cannot compile here: {message}"
    unsupported = ("not implemented for", "not supported", "unsupported", "no kernel", "does not support")
    if isinstance(exc, NotImplementedError) or any(s in message.lower() for s in unsupported):
        return "skipped", f"not supported here: {message}"
    return "failed", f"{type(exc).__name__}: {message}"
