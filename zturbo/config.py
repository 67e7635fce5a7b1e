"""Typed configuration: one pydantic model per concern, resolved in layers.

Precedence, lowest to highest::

    built-in defaults < profile < --config FILE < ZTURBO_<SECTION>__<FIELD> env < CLI flags

Settings are resolved once at the command boundary (``load_settings``) and passed
down as typed objects; library code never reads the environment itself.

One module of about 500 lines on purpose: every section, the layering and profile reading
are the one place a setting is defined, which a split across modules would scatter.
"""

from __future__ import annotations

import contextvars
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from zturbo.errors import ConfigError
from zturbo.model.config import AnyModelConfig, ModelConfig, format_validation_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PROFILE = "fast"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    data_dir: Path | None = None
    image_column: str | None = Field(None, description="Parquet data: the image column (None: auto-detected)")
    image_size: int = Field(1024, ge=8, le=16384)
    num_workers: int = Field(4, ge=0, le=256)
    random_flip: bool = True
    random_crop: bool = True
    val_images: int = Field(4, ge=0, description="images held out for the fixed sample grid")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="training JPEGs: gpu decodes them on the CUDA device (nvJPEG); auto: gpu when "
        "training on CUDA and the training files include JPEGs it can decode as they are; cpu: the loader's workers"
    )


class TrainConfig(Section):
    output_dir: Path = Path("runs/zturbo")
    batch_size: int = Field(24, ge=1, description="effective batch (micro-batch x accumulation)")
    micro_batch_size: int | None = Field(None, ge=1, description="None: chosen to fit the device")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1)
    warmup_epochs: float = Field(3, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_epochs when set")
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    mixed_precision: bool = True
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training step; auto: on for CUDA, off on CPU"
    )
    gradient_checkpointing: bool = False
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    sample_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    max_nonfinite_steps: int = Field(10, ge=1)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """Config files, environment values and flags of earlier versions say true / false."""
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.strip().lower() in ("true", "1", "yes")
        return ("on" if value else "off") if isinstance(value, bool) else value


class LossConfig(Section):
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    reconstruction_weight: float = Field(1.2, ge=0)
    perceptual_weight: float = Field(0.8, ge=0)
    perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    kl_weight: float = Field(1e-6, ge=0)
    disc_weight: float = Field(0.5, ge=0, description="0 disables the discriminator")
    disc_start: int = Field(50001, ge=0, description="step at which the discriminator loss starts")
    disc_layers: int = Field(3, ge=1, le=6)
    disc_learning_rate: float | None = Field(None, gt=0, description="None: same as train.learning_rate")
    adaptive_weight_max: float = Field(1e4, gt=0)
    lpips_size: int | None = Field(
        None, ge=16, description="LPIPS on a lpips_size view of reconstruction and target; None: full resolution"
    )
    lpips_view: Literal["resize", "crop"] = Field(
        "resize", description="resize: area-downsampled whole image; crop: one random lpips_size square"
    )


class DistillConfig(Section):
    """Training a student in an existing VAE's latent space (zturbo.distill; docs/distillation.md)."""

    teacher: Path | None = Field(None, description="the teacher VAE; None: no distillation")
    mode: Literal["decoder", "encoder", "both"] = "decoder"
    decoder_channels: list[int] | None = Field(None, min_length=1, max_length=8, description="None: the teacher's")
    encoder_channels: list[int] | None = Field(None, min_length=1, max_length=8, description="None: the teacher's")
    init: Literal["prune", "random"] = "prune"
    calibration_images: int = Field(
        16, ge=0, le=4096, description="training images (centre crops) the pruned layers are refit on; 0: none"
    )
    teacher_weight: float = Field(0.0, ge=0, description="weight of an L1 term to the teacher's reconstruction")
    latents_dir: Path | None = Field(None, description="`serve-batch encode` output of the teacher (decoder mode)")
    latent_channels: int | None = Field(None, ge=1, description="when set, must equal the teacher's")
    latent_family: str | None = Field(
        None, description="a single-file teacher's latent family when its shapes fit several (flux1, sd3, sdxl, ...)"
    )

    def student_widths(self, base: ModelConfig) -> tuple[list[int], list[int]]:
        """The student's (encoder, decoder) widths over ``base``: this section's for the side its mode
        trains, where given; ``base``'s otherwise."""
        encoder = self.encoder_channels if self.mode != "decoder" and self.encoder_channels else base.block_out_channels
        decoder = self.decoder_channels if self.mode != "encoder" and self.decoder_channels else base.decoder_channels
        return list(encoder), list(decoder)


def with_widths(base: ModelConfig, encoder: list[int], decoder: list[int], **update: Any) -> ModelConfig:
    """``base`` with other encoder and decoder widths (and ``update``), validated; ConfigError names the problem."""
    fields = base.model_dump()
    fields.update(block_out_channels=list(encoder),
                  decoder_block_out_channels=None if list(decoder) == list(encoder) else list(decoder), **update)
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise ConfigError(f"student widths: {format_validation_error(exc)}") from exc


class PrepareConfig(Section):
    size: int | None = Field(None, ge=8, le=16384, description="None: data.image_size")
    val_fraction: float = Field(0.02, ge=0, lt=1)
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG / WebP quality")
    png_compress_level: int = Field(3, ge=0, le=9, description="zlib level; 3 is ~3x faster than 6 and ~2% larger")
    resize: Literal["center-crop", "pad"] = "center-crop"
    min_size: int | None = Field(None, ge=1, description="None: size / 2")
    workers: int | None = Field(None, ge=1, le=1024, description="None: all usable cores")
    dedupe: bool = False
    max_pixels: int = Field(178_956_970, ge=1, description="decompression-bomb limit (pixels)")
    image_column: str | None = Field(None, description="Parquet input: the image column (None: auto-detected)")


class Tiling(Section):
    """Tiled encode and decode (``zturbo.tiling``), for the jobs that run a model on images."""

    tile: int | Literal["auto"] | None = Field(
        None, description="tile side in pixels, 'auto' (tiles only when untiled would not fit), None: whole images"
    )
    tile_mode: Literal["exact", "fast"] = Field("exact", description="exact: equals untiled; fast: one approximate pass")
    tile_memory_gb: float | None = Field(
        None, gt=0, description="budget for tile='auto' (None: the device's free memory, or available RAM on CPU)"
    )
    tile_recompute: bool = Field(
        False, description="exact decode: recompute the largest layers' inner maps instead of storing them (least memory)"
    )

    @field_validator("tile")
    @classmethod
    def _tile_positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive number of pixels or 'auto'")
        return value

    @model_validator(mode="after")
    def _recompute_needs_exact_tiles(self):
        if self.tile_recompute and (self.tile is None or self.tile_mode != "exact"):
            raise ValueError("tile_recompute applies to exact tiling: give a tile (--tile N or auto) in exact mode")
        return self

    def tile_options(self) -> dict[str, Any]:
        """Backend options for this tiling (none when images run whole)."""
        if self.tile is None:
            return {}
        budget = None if self.tile_memory_gb is None else int(self.tile_memory_gb * 2**30)
        options = {"tile": self.tile, "tile_mode": self.tile_mode, "tile_memory": budget}
        return {**options, "tile_recompute": True} if self.tile_recompute else options


class EvalConfig(Tiling):
    size: int | Literal["native"] = Field(
        256, description="square side (shorter side resized, then center-cropped) or 'native' (padded, cropped back)"
    )
    metrics: list[Literal["psnr", "ssim", "lpips", "rfid", "chroma_outlier"]] = Field(
        default_factory=lambda: ["psnr", "ssim", "lpips"], min_length=1
    )
    lpips_nets: list[Literal["alex", "vgg"]] = Field(default_factory=lambda: ["alex", "vgg"], min_length=1)
    backend: Literal["auto", "torch", "compile", "onnx", "trt"] = Field(
        "auto", description="auto: what the model path is (torch for weights, onnx / trt for exports)"
    )
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_images: int | None = Field(None, ge=1)
    worst_images: int = Field(5, ge=0, le=100, description="worst images listed in the summary")
    sheet_images: int = Field(4, ge=0, le=32, description="worst and best images each on the contact sheet")
    inception_weights: Path | None = Field(None, description="torch-fidelity Inception weights file for rFID")
    max_pixels: int = Field(178_956_970, ge=1, description="decompression-bomb limit (pixels)")
    image_column: str | None = Field(None, description="Parquet data: the image column (None: auto-detected)")

    @field_validator("size")
    @classmethod
    def _size_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 8 <= value <= 16384:
            raise ValueError("must be 'native' or an integer from 8 to 16384")
        return value


class BenchConfig(Tiling):
    resolutions: list[int] | None = Field(None, description="None: 256,512 on CPU, 512,1024 on GPU")
    batch_sizes: list[int] | None = Field(None, description="None: 1,4 on CPU, 1,8,24 on GPU")
    backends: list[Literal["auto", "torch", "compile", "onnx", "trt"]] = Field(
        default_factory=lambda: ["auto"],
        description="auto: what --model is (torch for weights or a random init, onnx / trt for exports)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    what: list[Literal["encode", "decode", "train"]] = Field(default_factory=lambda: ["encode", "decode"])
    repeats: int | None = Field(None, ge=1, description="None: 3 on CPU, 10 on GPU")
    warmup: int = Field(2, ge=0)
    channels_last: bool = False
    device: str = "auto"
    against: str | None = Field(None, description="'standard', 'diffusers', another profile name or a .toml path")
    max_regression: float = Field(0.10, ge=0, lt=10, description="fraction, for the --baseline gate")
    peak_matmul_size: int | None = Field(None, ge=64, description="None: 8192 on GPU, 1024 on CPU")


class ExportConfig(Section):
    format: Literal["onnx", "trt", "diffusers", "single-file", "taesd"] = "onnx"
    parts: list[Literal["encoder", "decoder"]] = Field(default_factory=lambda: ["encoder", "decoder"])
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="bf16: single-file only")
    layout: Literal["ldm", "diffusers"] = Field("ldm", description="single-file key names: LDM/BFL or diffusers")
    force: bool = Field(False, description="single-file, taesd: write what the other tools' loaders cannot express")
    opset: int = Field(18, ge=18, le=23, description="ONNX opset; the torch.export-based exporter needs >= 18")
    batch: tuple[int, int, int] = Field((1, 8, 24), description="min:opt:max batch of the dynamic axes / TRT profile")
    size: tuple[int, int, int] = Field((256, 1024, 2048), description="min:opt:max image side in pixels")
    apply_scaling: bool = Field(False, description="encoder emits (z - shift) * scale; decoder takes that latent")
    verify: bool = False
    calibration_images: int = Field(4, ge=1, le=64, description="photos run through the fp32 graph for fp16 ranges")
    calibration_size: int = Field(128, ge=16, le=2048, description="side of the calibration crops in pixels")
    fp16_headroom: float = Field(4.0, ge=1.0, description="keep fp32 where |activation| > 65504 / headroom")
    timing_cache: Path | None = Field(None, description="TensorRT timing cache; None: OUT/timing.cache")
    workspace_gb: float = Field(4.0, gt=0, description="TensorRT builder workspace limit")

    @field_validator("batch", "size")
    @classmethod
    def _min_opt_max(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        lo, opt, hi = value
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"needs 1 <= min <= opt <= max, got {lo}:{opt}:{hi}")
        return value

    @model_validator(mode="after")
    def _bf16_is_single_file(self):
        if self.precision == "bf16" and self.format != "single-file":
            raise ValueError(f"precision bf16 is for --format single-file; {self.format} takes fp32 or fp16")
        return self


class ServeConfig(Tiling):
    size: int | None = Field(None, ge=8, description="None: model sample_size")
    batch_size: int | Literal["auto"] = "auto"
    backend: Literal["auto", "torch", "compile", "onnx", "trt"] = Field(
        "auto", description="auto: what the model path is (torch for weights, onnx / trt for exports)"
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    latent_mode: Literal["mean", "sample"] = "mean"
    shard_size: int = Field(1000, ge=1)
    reading: Literal["auto", "threads", "streams", "phased"] = Field(
        "auto",
        description="how reading shares the machine with compute: 'threads' (a thread pool reads ahead, beside "
        "compute), 'streams' (CPU compute streams each read then compute their own batches) or 'phased' (each "
        "batch read just before it is computed, on every core); auto: streams when the model computes on a "
        "multi-core CPU with a thread on every core, phased on one core, threads otherwise (a GPU)",
    )
    streams: int | None = Field(
        None, ge=1, le=64,
        description="CPU compute streams (reading 'streams'), each with cores/streams torch threads; "
        "None: 2 up to 8 cores, then one per 4 cores, at most 4",
    )
    image_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(95, ge=1, le=100, description="jpeg / webp quality when decoding to images")
    restore_size: bool = Field(
        False,
        description="decode: write each image at the source resolution of the region it was encoded from "
        "(latents from an encode run; others keep the decoded size)",
    )
    resize: Literal["aspect", "square"] = Field(
        "aspect", description="aspect: nearest aspect-ratio bucket of about size^2 pixels; square: center-crop to size"
    )
    max_batch_size: int = Field(256, ge=1, description="upper bound for batch_size=auto")
    max_pixels: int = Field(178_956_970, ge=1, description="decompression-bomb limit (pixels)")
    seed: int = Field(0, description="seed of the per-image noise for latent_mode=sample")
    image_column: str | None = Field(None, description="Parquet inputs: the image column (None: auto-detected)")
    output_format: Literal["zturbo", "webdataset"] = Field(
        "zturbo", description="encode: zturbo (safetensors shards + index.json) or webdataset (a tar per input shard)"
    )
    latent_file: Literal["safetensors", "npy"] = Field("safetensors", description="webdataset output: latent files")
    engine: Literal["native", "ray"] = Field("native", description="encode: this process (native) or Ray Data")
    ray_address: str | None = Field(None, description="engine ray: the cluster to join (None: start a local one)")


_LAYERS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("zturbo_config_layers", default={})


class _LayeredSource(PydanticBaseSettingsSource):
    """Profile and --config file values, already merged (file over profile)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used instead
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _LAYERS.get()


class Settings(BaseSettings):
    """The whole resolved configuration, one attribute per concern."""

    model_config = SettingsConfigDict(
        env_prefix="ZTURBO_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    profile: str | None = Field(None, description="name or path of the profile applied")
    description: str = ""
    model: AnyModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Earlier sources win: CLI flags (init) > environment > profile + config file.
        return (init_settings, env_settings, _LayeredSource(settings_cls))

    @model_validator(mode="after")
    def _image_size_fits_model(self) -> Settings:
        factor = self.model.downsample_factor
        for where, size in (("data.image_size", self.data.image_size), ("model.sample_size", self.model.sample_size)):
            if size % factor:
                raise ValueError(f"{where}={size} must be divisible by the model's downsampling factor {factor}")
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, JSON or YAML mapping of sections; any problem becomes a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "check the path given to --config")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"unsupported config format '{suffix}' for {path}", "use .toml, .json or .yaml")
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # tomllib/json/yaml errors subclass ValueError
        raise ConfigError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # yaml.YAMLError does not subclass ValueError
        raise ConfigError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, train, ...), not {type(data).__name__}")
    return data


def profile_dir() -> Path:
    return Path(str(resources.files("zturbo") / "profiles"))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.toml"))


def read_profile(name_or_path: str | Path) -> dict[str, Any]:
    candidate = Path(name_or_path)
    if candidate.suffix in (".toml", ".json", ".yaml", ".yml") or candidate.is_file():  # a folder named "demo" is no profile
        data = read_config_file(candidate)
    else:
        path = profile_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(
                f"unknown profile '{name_or_path}'",
                f"choose one of: {', '.join(available_profiles())} (or give a path to a .toml file)",
            )
        data = read_config_file(path)
    data.setdefault("profile", str(name_or_path))
    return data


def load_settings(
    profile: str | Path | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    default_profile: str | None = DEFAULT_PROFILE,
) -> Settings:
    """Resolve the full configuration.

    ``overrides`` is a nested mapping of the CLI flags the user actually gave,
    e.g. ``{"train": {"batch_size": 8}}``; ``None`` values are dropped.
    """
    layers: dict[str, Any] = {}
    chosen = profile if profile is not None else default_profile
    if chosen is not None:
        layers = read_profile(chosen)
    if config_file is not None:
        from_file = read_config_file(config_file)
        layers = deep_merge(_one_architecture(layers, from_file), from_file)
    given = _drop_none(overrides or {})
    layers = _one_architecture(layers, given)
    train_given = given.get("train", {})
    if "epochs" in train_given and "max_steps" not in train_given:
        # An explicit epoch count beats a step count from a lower layer (profile, file, environment).
        given["train"] = {**train_given, "max_steps": None}
    token = _LAYERS.set(layers)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {format_validation_error(exc)}") from exc
    finally:
        _LAYERS.reset(token)
    return _derived_defaults(settings)


def _one_architecture(layers: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``layers`` without their model section when the layer ``over`` them (a config file, the flags) names
    another architecture: the fields of one family mean nothing to the other (``--architecture tiny`` over
    a profile's AutoencoderKL)."""
    model = over.get("model")
    wanted = model.get("architecture") if isinstance(model, dict) else None
    below = layers.get("model", {})
    if wanted is None or not isinstance(below, dict) or below.get("architecture", "kl") == wanted:
        return layers
    return {k: v for k, v in layers.items() if k != "model"}


def _derived_defaults(settings: Settings) -> Settings:
    """Defaults that follow other settings, filled in once here so no caller patches them later."""
    data, prepare, model = settings.data, settings.prepare, settings.model
    if data.data_dir is None and settings.profile == "demo":
        data = data.model_copy(update={"data_dir": demo_data_dir()})  # the demo trains on the bundled photos
    if prepare.size is None:
        prepare = prepare.model_copy(update={"size": data.image_size})  # prepare for the size training uses
    # Without a teacher, [model] is the shape of one and the model is its student, with the [distill]
    # widths: a distillation profile states them once, there. With a teacher, the student is the
    # teacher's config with those widths (zturbo.distill.student_settings).
    if isinstance(model, ModelConfig):
        widths = settings.distill.student_widths(model)
        if settings.distill.teacher is None and widths != (model.block_out_channels, model.decoder_channels):
            model = with_widths(model, *widths)
    return settings.model_copy(update={"data": data, "prepare": prepare, "model": model})


def demo_data_dir() -> Path:
    """Folder of the bundled CC0 / public-domain sample photos (see SOURCES.md there)."""
    return Path(str(resources.files("zturbo") / "data" / "demo"))


def _drop_none(tree: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        elif value is None:
            continue
        out[key] = value
    return out
