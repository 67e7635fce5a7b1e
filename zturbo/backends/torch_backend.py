"""PyTorch backends: eager, and torch.compile'd."""

from __future__ import annotations

import torch

from zturbo.artifacts import TORCH_KINDS, require
from zturbo.backends.base import Backend
from zturbo.backends.fp16_guard import Fp16Guard, guard_fp16
from zturbo.errors import UsageError
from zturbo.model import VAE, ModelConfig
from zturbo.distill.fingerprint import encoder_fingerprint
from zturbo.utils import resolve_device, resolve_dtype


def default_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Channels-last where it measured faster: CUDA in half precision, where the Triton GroupNorm
    kernels apply (fast decode 1024 px b8 bf16 on an H100, eager: 156 ms against 258 ms NCHW).
    Elsewhere NCHW: PyTorch's own GroupNorm has no fast channels-last kernel."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


class TorchBackend(Backend):
    """A torch module on one device and precision; ``compiled=True`` wraps both passes in torch.compile.

    ``channels_last=None`` picks the layout by ``default_channels_last``.

    Subclasses wrapping another module layout override ``_encode_impl`` / ``_decode_impl`` and pass
    ``config``, the module's architecture as a ``ModelConfig`` (default: ``vae.config``).
    """

    name = "torch"

    def __init__(
        self,
        vae,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool | None = None,
        compiled: bool = False,
        mode: str | None = None,
        config: ModelConfig | None = None,
        tile: int | str | None = None,
        tile_mode: str = "exact",
        tile_memory: int | None = None,
        tile_recompute: bool = False,
    ):
        if tile is not None and compiled:
            raise UsageError("tiled encode and decode run eagerly", "use --backend torch with --tile")
        self.tiling = {} if tile is None else {"tile": tile, "tile_mode": tile_mode, "memory_budget": tile_memory}
        if tile_recompute and (tile is None or tile_mode != "exact"):
            raise UsageError("--tile-recompute applies to exact tiling", "add --tile N (or auto) and --tile-mode exact")
        self.decode_tiling = {**self.tiling, "recompute": True} if tile_recompute else self.tiling
        self.device = device
        self.dtype = dtype
        if channels_last is None:
            channels_last = default_channels_last(device, dtype)
        self.channels_last = channels_last
        config = config or vae.config
        # Of the weights as given, before the cast to the computing precision (serve-batch encode records it).
        self.fingerprint = encoder_fingerprint(vae.state_dict(), config)
        self.fp16_guard = self._cast(vae, device, dtype)
        if self.fp16_guard is not None and self.fp16_guard.kept and tile is not None:
            raise UsageError(
                f"--precision fp16 with --tile: this model's activations reach {self.fp16_guard.max_activation:.4g} "
                f"(fp16 ends at 65504), so {len(self.fp16_guard.kept)} layers must run in fp32, which the tiled "
                "engines do not do", "use --precision bf16 (fp32's range), or fp16 without --tile",
            )
        vae = vae.eval()
        if channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        for p in vae.parameters():
            p.requires_grad_(False)
        self.vae = vae
        self.latent_channels = config.latent_channels
        self.downsample_factor = config.downsample_factor
        # dynamic=False: one graph per input shape, the fastest code for each.
        self._encode = torch.compile(self._encode_impl, mode=mode, dynamic=False) if compiled else self._encode_impl
        self._decode = torch.compile(self._decode_impl, mode=mode, dynamic=False) if compiled else self._decode_impl

    @staticmethod
    def _cast(vae, device: torch.device, dtype: torch.dtype) -> Fp16Guard | None:
        """Move ``vae`` to ``device`` and ``dtype``; fp16 with the overflow guard for our VAE (the plan, else None)."""
        previous = getattr(vae, "fp16_guard", None)
        if previous is not None:  # the module was guarded by an earlier backend: start from plain weights
            previous.remove()
        if dtype != torch.float16 or not isinstance(vae, VAE):
            vae.to(device=device, dtype=dtype)
            return None
        vae.fp16_guard = guard_fp16(vae, device)
        return vae.fp16_guard

    def describe(self) -> dict:
        out = super().describe()
        if self.fp16_guard is not None:
            out["fp16_guard"] = self.fp16_guard.summary()
        return out

    @classmethod
    def load(
        cls,
        model,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
        **options,
    ):
        """``model``: a VAE, or a path / Artifact of a torch kind (model, run, step-N, diffusers folder)."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        vae = model if isinstance(model, VAE) else require(model, TORCH_KINDS, f"the {cls.name} backend").load_vae()
        return cls(vae, dev, resolve_dtype(precision), channels_last=channels_last, **options)

    def _encode_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x, **self.tiling).mean

    def _decode_impl(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, **self.decode_tiling)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(self._prep(images))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(self._prep(latents))


class CompiledTorchBackend(TorchBackend):
    """torch.compile'd encoder and decoder."""

    name = "compile"

    @classmethod
    def load(cls, model, device="auto", precision="fp32", channels_last: bool | None = None, mode: str | None = None,
             **_):
        return super().load(model, device=device, precision=precision, channels_last=channels_last, compiled=True,
                            mode=mode)
