"""The device step: a batch to the device, normalised there, through the backend, and back to the host.

On CUDA nothing here waits for the GPU: the copy back is asynchronous and the step's
result carries the event that says when it is done, plus CUDA events timing the
compute; the writer thread waits on them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from zturbo.backends import open_backend
from zturbo.config import ServeConfig
from zturbo.errors import UsageError


def load_backend(model: Any, cfg: ServeConfig, device: str | torch.device | None = None):
    """The backend serve computes with: ``model`` (any artifact a backend runs, or a VAE) on ``device``.

    ``cfg.backend="auto"`` picks the backend the artifact's kind needs (an ONNX export runs on ONNX Runtime).
    """
    return open_backend(model, cfg.backend, job="serve-batch", device=device or cfg.device, precision=cfg.precision,
                        **cfg.tile_options())


def model_sample_size(backend) -> int:
    """The image side the model was made for, from whichever place the backend keeps it."""
    size = getattr(getattr(getattr(backend, "vae", None), "config", None), "sample_size", None)
    size = size or getattr(backend, "sample_size", None)
    size = size or (getattr(backend, "meta", None) or {}).get("model", {}).get("sample_size")  # export folders
    if not size:
        raise UsageError(f"the '{backend.name}' backend does not say its image size", "give --size")
    return int(size)


@dataclass
class StepResult:
    """One computed batch. On CUDA ``host`` is still being filled until ``ready`` has passed."""

    host: torch.Tensor  # latents (encode) or uint8 (n, H, W, 3) images (decode), on the host
    finite: torch.Tensor | None = None  # per row, whether the model's output was all finite
    ready: torch.cuda.Event | None = None  # None: ``host`` is complete already (CPU compute)
    seconds: float = 0.0  # compute time, measured on the host (CPU compute)
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # compute start and end (CUDA)

    def wait(self) -> float:
        """Block until ``host`` is complete; returns the compute time in seconds."""
        if self.ready is None:
            return self.seconds
        self.ready.synchronize()
        start, end = self.events
        return start.elapsed_time(end) / 1000.0


class DeviceStep:
    """Normalise on the device, run the backend, start the copy back."""

    def __init__(self, backend, op: str, latent_mode: str = "mean", seed: int = 0):
        self.backend = backend
        self.op = op
        self.device = backend.device
        self.cuda = self.device.type == "cuda"
        self.sample = latent_mode == "sample"
        self.seed = seed
        if self.sample and not hasattr(backend, "vae"):
            raise UsageError(
                f"--sample needs the posterior's variance, which the '{backend.name}' backend does not output",
                "use --mean, or --backend torch / compile",
            )

    def images_in(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if not self.sample:
            return self.backend.encode(x)
        vae = self.backend.vae
        posterior = vae.encode(x.to(self.backend.dtype))
        noise = torch.stack([
            torch.randn(posterior.mean.shape[1:], generator=self._generator(k), dtype=torch.float32) for k in keys
        ]).to(posterior.mean.device, posterior.mean.dtype, non_blocking=True)
        return posterior.mean + posterior.std * noise

    def _generator(self, key: str) -> torch.Generator:
        # Per-image noise seeded by the image's name: a rerun after a crash gives the same sample.
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "big") & ((1 << 63) - 1))

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (n, H, W, 3) images, and per image whether the model's output was all finite
        (clamping would turn a NaN into a black pixel and an inf into a saturated one)."""
        x = self.backend.decode(z.to(self.device, non_blocking=True))
        finite = _all_finite(x)
        # To uint8 on the device: a quarter of the bytes to copy back.
        return ((x.float().clamp_(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8).permute(0, 2, 3, 1), finite

    def run(self, data: torch.Tensor, keys: list[str]) -> StepResult:
        """Compute one batch (uint8 images to encode, or latents to decode) without waiting for a GPU."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        if self.op == "encode":
            out = self.encode(self.images_in(data), keys)
            finite = _all_finite(out)
        else:
            out, finite = self.decode(data)
        if not self.cuda:
            return StepResult(out.contiguous().cpu(), finite.cpu(), seconds=time.perf_counter() - t0)
        end.record()
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host_finite.copy_(finite, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return StepResult(host, host_finite, ready=ready, events=(start, end))


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Per batch row: True when every value is finite."""
    return torch.isfinite(x).flatten(1).all(1)
