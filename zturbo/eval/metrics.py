"""Reconstruction metrics on 8-bit images, computed with torchmetrics and lpips.

Every metric sees what a user would see: both images clamped, rounded to 8 bits
and compared as 0..255 values (PSNR and SSIM, the way image codecs report them)
or mapped back to [-1, 1] from those 8-bit values (LPIPS). Per-image values come
back as 1-D tensors; rFID is a dataset-level statistic accumulated per model.

A random-backbone LPIPS or FID feature network exists only to test the plumbing;
its values carry ``_random`` in their names so they can never pass for quality.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from zturbo.errors import MissingDependencyError, ZTurboError
from zturbo.eval.chroma import chroma_outlier
from zturbo.perceptual import MissingWeightsError, load_lpips

DATA_RANGE = 255.0
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# torchmetrics' MS-SSIM needs side // (scales - 1)^2 > kernel - 1 (176 px for five scales).
MS_SSIM_MIN_SIDE = SSIM_KERNEL * (len(MS_SSIM_BETAS) - 1) ** 2
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

# Direction of each metric: True when a larger value is better.
HIGHER_IS_BETTER = {
    "psnr": True, "ssim": True, "ms_ssim": True, "lpips": False, "rfid": False, "chroma_outlier": False
}


def higher_is_better(metric: str) -> bool:
    """Direction of a metric name as reported (``lpips_vgg``, ``ms_ssim``, ``rfid_random``...)."""
    base = metric.removesuffix("_random")
    return HIGHER_IS_BETTER["lpips" if base.startswith("lpips") else base]


def psnr_uint8(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of 0..255 images (B, C, H, W); inf where they are identical."""
    return peak_signal_noise_ratio(
        reconstruction.double(), original.double(), data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)
    ).float()


def ssim_uint8(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) as in Wang et al.'s reference code.

    torchmetrics gives the SSIM map over reflection-padded borders; the reference
    (and scikit-image) average only where the window lies inside the image, so the
    map's 5-pixel border is cropped before the mean.
    """
    if min(original.shape[-2:]) < SSIM_KERNEL:
        return torch.full((original.shape[0],), math.nan)
    # Scaled to [0, 1] in float32: float64 convolutions are many times slower on CPU, and SSIM is scale-free.
    _, ssim_map = structural_similarity_index_measure(
        reconstruction.float() / DATA_RANGE,
        original.float() / DATA_RANGE,
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL,
        data_range=1.0,
        reduction="none",
        return_full_image=True,
    )
    border = (SSIM_KERNEL - 1) // 2
    return ssim_map[..., border:-border, border:-border].mean(dim=(1, 2, 3)).float()


def ms_ssim_uint8(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM over five scales; NaN where the image is too small for five scales.

    ``normalize="relu"`` keeps a negative contrast term at a coarse scale (a badly
    broken reconstruction) from turning the product into NaN.
    """
    if min(original.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return torch.full((original.shape[0],), math.nan)
    return multiscale_structural_similarity_index_measure(
        reconstruction.float() / DATA_RANGE,
        original.float() / DATA_RANGE,
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL,
        data_range=1.0,
        betas=MS_SSIM_BETAS,
        normalize="relu",
        reduction="none",
    ).float()


class MetricSuite:
    """The metrics one evaluation computes, loaded once and shared by every model compared.

    ``update(model_key, reconstruction, original)`` takes uint8 (B, 3, H, W) tensors
    and returns the per-image values; ``dataset_metrics(model_key)`` returns rFID.
    ``seconds`` accumulates the time spent in each metric.
    """

    def __init__(
        self,
        metrics: list[str],
        device: torch.device,
        *,
        lpips_nets: list[str] = ("alex", "vgg"),
        lpips_random_backbone: bool = False,
        allow_download: bool = True,
        fid_feature: nn.Module | None = None,
        inception_weights: Path | None = None,
        missing_weights: Literal["error", "skip"] = "error",
    ):
        self.device = device
        self.requested = list(metrics)
        self.unavailable: dict[str, str] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.lpips: dict[str, nn.Module] = {}
        self.lpips_random = lpips_random_backbone
        self._fid_factory = None
        self._fid: dict[str, nn.Module] = {}
        self.fid_random = False

        if "lpips" in metrics:
            for net in lpips_nets:
                try:
                    self.lpips[net] = load_lpips(
                        net,
                        device,
                        random_backbone=lpips_random_backbone,
                        allow_download=allow_download,
                        without="leave LPIPS out with --metrics psnr,ssim",
                    )
                except (MissingWeightsError, MissingDependencyError) as exc:
                    if missing_weights == "error":
                        raise
                    self.unavailable[f"lpips_{net}"] = exc.message
        if "rfid" in metrics:
            try:
                self._fid_factory = _fid_factory(fid_feature, inception_weights, allow_download, device)
                self.fid_random = fid_feature is not None
            except (MissingWeightsError, MissingDependencyError) as exc:
                if missing_weights == "error":
                    raise
                self.unavailable["rfid"] = exc.message

    @property
    def per_image_names(self) -> list[str]:
        names = []
        if "psnr" in self.requested:
            names.append("psnr")
        if "ssim" in self.requested:
            names += ["ssim", "ms_ssim"]
        suffix = "_random" if self.lpips_random else ""
        names += [f"lpips_{net}{suffix}" for net in self.lpips]
        if "chroma_outlier" in self.requested:
            names.append("chroma_outlier")
        return names

    @property
    def dataset_names(self) -> list[str]:
        if self._fid_factory is None:
            return []
        return ["rfid_random" if self.fid_random else "rfid"]

    def _timed(self, name: str, fn, *args) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start
        return out

    @torch.inference_mode()
    def update(
        self, model_key: str, reconstruction: torch.Tensor, original: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        rec = reconstruction.to(self.device)
        ref = original.to(self.device)
        out: dict[str, torch.Tensor] = {}
        if "psnr" in self.requested:
            out["psnr"] = self._timed("psnr", psnr_uint8, rec, ref)
        if "ssim" in self.requested:
            out["ssim"] = self._timed("ssim", ssim_uint8, rec, ref)
            out["ms_ssim"] = self._timed("ms_ssim", ms_ssim_uint8, rec, ref)
        if self.lpips:
            rec_pm = rec.float() / 127.5 - 1.0
            ref_pm = ref.float() / 127.5 - 1.0
            suffix = "_random" if self.lpips_random else ""
            for net, model in self.lpips.items():
                name = f"lpips_{net}{suffix}"
                out[name] = self._timed(
                    name, lambda a, b, net=model: net(a, b).flatten().float(), rec_pm, ref_pm
                )
        if "chroma_outlier" in self.requested:
            out["chroma_outlier"] = self._timed("chroma_outlier", chroma_outlier, rec, ref)
        if self._fid_factory is not None:
            fid = self._fid.get(model_key)
            if fid is None:
                fid = self._fid[model_key] = self._fid_factory()
            name = self.dataset_names[0]
            self._timed(name, _fid_update, fid, rec, ref)
        return {k: v.detach().cpu() for k, v in out.items()}

    def reset(self) -> None:
        """Forget accumulated times and rFID statistics, keeping the loaded networks."""
        self.seconds.clear()
        self._fid.clear()

    def dataset_metrics(self, model_key: str) -> dict[str, float]:
        fid = self._fid.get(model_key)
        if fid is None:
            return {}
        if int(fid.real_features_num_samples) < 2:
            raise ZTurboError(
                "rFID needs at least 2 images", "evaluate more images or leave rfid out of --metrics"
            )
        name = self.dataset_names[0]
        with torch.inference_mode():
            value = self._timed(name, fid.compute)
        return {name: float(value)}


def _fid_update(fid, reconstruction: torch.Tensor, original: torch.Tensor) -> None:
    # Inception resizes internally; the feature network sees 8-bit images, as in the FID reference code.
    fid.update(original.to(torch.uint8), real=True)
    fid.update(reconstruction.to(torch.uint8), real=False)


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(INCEPTION_URL).name


def _fid_factory(feature: nn.Module | None, weights: Path | None, allow_download: bool, device: torch.device):
    """A constructor for torchmetrics' FID, with Inception weights checked up front."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is not None:
        return lambda: FrechetInceptionDistance(feature=feature).to(device)
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics takes its Inception network from there
    except ImportError:
        raise MissingDependencyError(
            "torch-fidelity", "rFID (the Inception network of the FID reference implementation)"
        ) from None
    path = Path(weights) if weights is not None else inception_weights_path()
    hint = (
        f"download {INCEPTION_URL} and put it at {inception_weights_path()} (or pass its path as "
        "eval.inception_weights), or leave rfid out of --metrics"
    )
    if weights is not None and not path.is_file():
        raise MissingWeightsError(f"Inception weights for rFID not found: {path}", hint)
    if not path.is_file():
        if not allow_download:
            raise MissingWeightsError(f"Inception weights for rFID not found: {path}", hint)
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30.0)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
        except Exception as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise MissingWeightsError(
                f"Inception weights for rFID are not at {path} and could not be downloaded ({type(exc).__name__})",
                hint,
            ) from exc
        finally:
            socket.setdefaulttimeout(previous)
    return lambda: FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path)).to(device)
