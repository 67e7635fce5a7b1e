"""One optimisation step, independent of data, logging and checkpoints.

``TrainEngine`` owns the model, EMA, losses, discriminator, optimizers, LR
schedulers and grad scalers, and runs a full step on one effective batch:
split into micro-batches, gradient accumulation (DDP-synchronised only on the
last micro-batch), autocast, clipping, the non-finite guard, the optimizer and
EMA updates, and the discriminator step. On CUDA an out-of-memory micro-batch
halves the micro-batch size and retries the step.

Nothing in the accumulation loop waits for the device: loss terms are summed as
tensors and read back, with the gradient norm, in one transfer per optimizer step,
where the non-finite guard looks at them. With ``train.compile`` (auto: on for
CUDA) the forward, the reconstruction losses, the generator's GAN term and the
discriminator loss are each one compiled graph (``dynamic=False``: one graph per
micro-batch shape). When a discriminator is configured the decoder's last conv
runs eagerly between graphs: the adaptive GAN weight takes two gradients at its
weight, and through one compiled graph each would run the whole VAE backward.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from zturbo.config import Settings
from zturbo.data.batch import ForwardResult, TrainBatch
from zturbo.data.datasets import to_unit_range
from zturbo.data.jpeg_device import EncodedBatch
from zturbo.errors import ZTurboError
from zturbo.model import VAE
from zturbo.train.discriminator import NLayerDiscriminator
from zturbo.model.kernels import probe_triton_group_norm
from zturbo.perceptual import load_lpips
from zturbo.train.compile import CompileWatch, resolve_compile
from zturbo.train.distributed import DistContext, any_true
from zturbo.train.ema import EMA
from zturbo.train.losses import VAELoss, check_lpips_size, discriminator_loss, generator_loss
from zturbo.train.memory import does_not_fit
from zturbo.train.schedule import make_scheduler


class NonFiniteLossError(ZTurboError):
    """Too many steps in a row had a non-finite loss or gradient."""


def resolve_precision(precision: str, mixed_precision: bool, device: torch.device) -> str:
    """'auto' means the best mixed precision the device supports (fp32 on CPU), or fp32 when mixed is off."""
    if precision != "auto":
        # fp16 on CPU works (autocast + GradScaler) but is slow on most CPUs; it is allowed so the
        # GPU's fp16 recipe can be reproduced and tested anywhere.
        return precision
    if not mixed_precision or device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class TrainForward(nn.Module):
    """encode -> reparameterised sample -> decode in one forward (what DDP and compile wrap).

    Accepts zturbo's VAE or a diffusers ``AutoencoderKL`` (for like-for-like benchmarks).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, batch: TrainBatch, noise: torch.Tensor) -> ForwardResult:
        posterior = self.vae.encode(batch.images)
        posterior = getattr(posterior, "latent_dist", posterior)
        mean, logvar = posterior.mean, torch.clamp(posterior.logvar, -30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        recon = self.vae.decode(z)
        return ForwardResult(getattr(recon, "sample", recon), mean, logvar)


@dataclass
class StepResult:
    terms: dict[str, float]
    grad_norm: float
    skipped: bool
    lr: float
    micro_batch: int
    disc_active: bool
    extra: dict[str, float] = field(default_factory=dict)


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return ((seed * 7_919 + step) * 104_729 + rank * 1_009 + micro) % (2**63 - 1)


class TrainEngine:
    def __init__(
        self,
        settings: Settings,
        device: torch.device,
        *,
        dist_ctx: DistContext | None = None,
        model: nn.Module | None = None,
        forward_module: nn.Module | None = None,
        perceptual: nn.Module | None = None,
        lpips_random_backbone: bool = False,
        total_steps: int = 1,
        warmup_steps: int = 0,
        per_rank_batch: int | None = None,
        log: Callable[[str], None] | None = None,
    ):
        """``model`` (default: a new VAE of ``settings.model``) is trained through ``forward_module``
        (default: ``TrainForward``; distillation's runs the student and its teacher)."""
        self.settings = settings
        self.device = device
        self.dist = dist_ctx or DistContext()
        self.log = log or (lambda message: None)
        tcfg = settings.train
        self.precision = resolve_precision(tcfg.precision, tcfg.mixed_precision, device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.per_rank_batch = per_rank_batch or max(1, tcfg.batch_size // self.dist.world_size)
        self.channels_last = device.type == "cuda"
        self.vae = self._place_model(model)
        self.ema = EMA(self.vae, tcfg.ema_decay)
        self.loss = self._make_loss(perceptual, lpips_random_backbone)
        self.disc = self._make_discriminator()
        self._make_optimizers(total_steps, warmup_steps)
        self._make_step_functions(forward_module if forward_module is not None else TrainForward(self.vae))
        self.micro_batch = min(tcfg.micro_batch_size or self.per_rank_batch, self.per_rank_batch)
        self.nonfinite_streak = 0
        self.skipped_steps = 0

    # -- set-up ---------------------------------------------------------------------------------------
    def _place_model(self, model: nn.Module | None) -> nn.Module:
        """The trained model on the device, in training mode (the same initial weights on every rank)."""
        tcfg = self.settings.train
        torch.manual_seed(tcfg.seed)
        vae = (model if model is not None else VAE(self.settings.model)).to(self.device)
        if tcfg.gradient_checkpointing and hasattr(vae, "enable_gradient_checkpointing"):
            vae.enable_gradient_checkpointing()
        if self.channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        return vae.train()

    def _make_loss(self, perceptual: nn.Module | None, lpips_random_backbone: bool) -> VAELoss:
        lcfg, size = self.settings.loss, self.settings.data.image_size
        if lcfg.perceptual_weight > 0:  # before the backbone loads (or downloads)
            check_lpips_size(lcfg.lpips_size, size, size)
            if perceptual is None:
                perceptual = load_lpips(lcfg.perceptual_net, self.device, random_backbone=lpips_random_backbone)
        return VAELoss(lcfg, perceptual)

    def _make_discriminator(self) -> nn.Module | None:
        lcfg = self.settings.loss
        if lcfg.disc_weight <= 0:
            return None
        disc = NLayerDiscriminator(self.settings.model.out_channels, n_layers=lcfg.disc_layers).to(self.device)
        return disc.to(memory_format=torch.channels_last) if self.channels_last else disc

    def _make_optimizers(self, total_steps: int, warmup_steps: int) -> None:
        """AdamW, its LR schedule and grad scaler for the model and, with a GAN, for the discriminator."""
        tcfg, lcfg = self.settings.train, self.settings.loss
        # One fused kernel over all parameters on CUDA; elsewhere the multi-tensor (foreach) update.
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [p for p in self.vae.parameters() if p.requires_grad],  # a distilled model's frozen parts stay out
            lr=tcfg.learning_rate, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay,
            fused=fused, foreach=not fused,
        )
        self.scheduler = make_scheduler(self.optimizer, warmup_steps, total_steps, tcfg.min_lr_ratio)
        scaler_on = self.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaler_on)
        self.disc_scaler = torch.amp.GradScaler(self.device.type, enabled=scaler_on)
        self.disc_optimizer = self.disc_scheduler = None
        if self.disc is not None:
            # Betas (0.5, 0.9) as in the reference discriminator training.
            self.disc_optimizer = torch.optim.AdamW(
                self.disc.parameters(), lr=lcfg.disc_learning_rate or tcfg.learning_rate, betas=(0.5, 0.9),
                fused=fused, foreach=not fused,
            )
            self.disc_scheduler = make_scheduler(self.disc_optimizer, warmup_steps, total_steps, tcfg.min_lr_ratio)

    def _make_step_functions(self, forward: nn.Module) -> None:
        """The forward and the loss terms a step calls: DDP-wrapped under torchrun, compiled when asked."""
        self.disc_train: nn.Module | None = self.disc
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DDP(forward, device_ids=ids)
            if self.disc is not None:
                self.disc_train = DDP(self.disc, device_ids=ids)
        self.compiled = resolve_compile(self.settings.train.compile, self.device, self.log)
        if self.device.type == "cuda" and self.autocast_dtype is not None:
            # Before tracing: a graph cannot fall back. (A diffusers model, benchmarked alike, has no kernel choice.)
            choice = self.vae.kernels.group_norm if hasattr(self.vae, "kernels") else "auto"
            probe_triton_group_norm(self.device, self.autocast_dtype, choice)
        self.compile_watch = CompileWatch(self.compiled)
        recon_terms = self.loss.reconstruction_terms
        gen_term = disc_term = None
        if self.disc is not None:
            gen_term = lambda recon: generator_loss(self.disc, recon)
            disc_term = lambda real, recon: discriminator_loss(self.disc_train, real, recon)
        self._eager_forward = forward  # for fit_micro_batch: no extra compile for a one-image probe
        if self.compiled:
            if self.disc is not None:
                last_conv = self.vae.decoder.conv_out
                last_conv.forward = torch.compiler.disable(last_conv.forward, recursive=False)
            forward = torch.compile(forward, dynamic=False)
            recon_terms = torch.compile(recon_terms, dynamic=False)
            if self.disc is not None:
                gen_term = torch.compile(gen_term, dynamic=False)
                disc_term = torch.compile(disc_term, dynamic=False)
        self.forward, self.reconstruction_terms = forward, recon_terms
        self.generator_term, self.discriminator_term = gen_term, disc_term

    # ------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _latent_noise(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        f = 2 ** (len(self.settings.model.block_out_channels) - 1)
        shape = (x.shape[0], self.settings.model.latent_channels, x.shape[2] // f, x.shape[3] // f)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=gen)
        if self.device.type == "cuda":
            noise = noise.pin_memory()  # a copy from pageable memory would wait for the GPU
        return noise.to(self.device, non_blocking=True)

    def _crop_offset(self, size: int, seed: int) -> torch.Tensor | None:
        """Top-left corner of a micro-batch's LPIPS square (lpips_view "crop"), from the step's seed."""
        lcfg = self.settings.loss
        if lcfg.lpips_view != "crop" or lcfg.lpips_size is None or lcfg.lpips_size >= size:
            return None
        gen = torch.Generator().manual_seed(seed)
        offset = torch.randint(0, size - lcfg.lpips_size + 1, (2,), generator=gen)
        if self.device.type == "cuda":
            offset = offset.pin_memory()
        return offset.to(self.device, non_blocking=True)

    def disc_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.settings.loss.disc_start

    def step(self, batch: TrainBatch | torch.Tensor, step: int) -> StepResult:
        """One optimizer step on ``batch`` (this rank's share of the effective batch), at global ``step``.

        A tensor is a batch of images alone. An ``EncodedBatch`` of images (a loader with
        ``device_decode``) is decoded on this device first; uint8 images (``as_uint8``) are
        copied as they are and scaled to [-1, 1] there.
        """
        batch = batch if isinstance(batch, TrainBatch) else TrainBatch(batch)
        batch = replace(batch, images=self._device_images(batch.images))
        while True:
            try:
                return self._step(batch, step)
            except torch.OutOfMemoryError:
                if self.device.type != "cuda":
                    raise
                self._halve_micro_batch(batch.images.shape[-1])

    def _device_images(self, images: torch.Tensor | EncodedBatch) -> torch.Tensor:
        if isinstance(images, EncodedBatch):
            return images.decode(self.device)
        if images.dtype == torch.uint8:
            return to_unit_range(images.to(self.device, non_blocking=True))
        return images

    def _halve_micro_batch(self, image_size: int) -> None:
        """After a CUDA out-of-memory error: drop the step's gradients and retry at half the micro-batch."""
        if self.micro_batch == 1:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            raise does_not_fit(self.settings.profile, image_size, peak, total,
                               self.settings.train.gradient_checkpointing) from None
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        old, self.micro_batch = self.micro_batch, max(1, self.micro_batch // 2)
        self.log(f"out of GPU memory at micro-batch {old}: retrying the step with micro-batch {self.micro_batch}")

    def _step(self, batch: TrainBatch, step: int) -> StepResult:
        use_disc = self.disc_active(step)
        sums = self._accumulate(batch, step, use_disc)
        self.compile_watch.after_step(self.log)
        return self._update(sums, step, use_disc)

    def _accumulate(self, batch: TrainBatch, step: int, use_disc: bool) -> dict[str, torch.Tensor]:
        """Forward and backward over the micro-batches; the loss terms, weighted by micro-batch size, summed."""
        n = len(batch)
        micro_batches = batch.split(self.micro_batch)
        sums: dict[str, torch.Tensor] = {}
        last_layer = self.vae.decoder.conv_out.weight
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            weight = len(micro) / n
            micro = micro.to(self.device, self.channels_last)
            x = micro.images
            seed = step_seed(self.settings.train.seed, step, self.dist.rank, i)
            noise = self._latent_noise(x, seed)
            crop = self._crop_offset(x.shape[-1], seed + 1)
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.forward.no_sync()
            with sync:
                with self._autocast():
                    out = self.forward(micro, noise)
                    nll, kl, terms = self.reconstruction_terms(x, out.recon, out.mean, out.logvar, crop)
                    g = None
                    if use_disc:
                        self.disc.requires_grad_(False)
                        g = self.generator_term(out.recon)
                    total = self.loss.combine(nll, kl, terms, g, last_layer if use_disc else None)
                    if out.extra_loss is not None:  # what the forward adds (distillation's own terms)
                        total = total + out.extra_loss
                    terms.update(out.terms)
                self.scaler.scale(total * weight).backward()
            terms["loss"] = total.detach()
            if use_disc:
                self.disc.requires_grad_(True)
                with contextlib.nullcontext() if last or not self.dist.enabled else self.disc_train.no_sync():
                    with self._autocast():
                        d_loss = self.discriminator_term(x, out.recon)
                    self.disc_scaler.scale(d_loss * weight).backward()
                terms["d"] = d_loss.detach()
            for k, v in terms.items():
                term = v.float() * weight
                sums[k] = sums[k] + term if k in sums else term
        return sums

    def _update(self, sums: dict[str, torch.Tensor], step: int, use_disc: bool) -> StepResult:
        """Clip, guard against non-finite values, then the optimizer, EMA and discriminator updates."""
        tcfg = self.settings.train
        self.scaler.unscale_(self.optimizer)
        clip = tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), clip)
        # The one read-back of the step: every logged term and the gradient norm in one transfer.
        read = torch.stack([*sums.values(), norm.float().reshape(())]).tolist()
        values, grad_norm = dict(zip(sums, read[:-1])), read[-1]
        loss_ok = all(math.isfinite(v) for v in values.values())
        # Under fp16 an overflowing gradient is the scaler's business (it skips and backs off).
        grads_ok = math.isfinite(grad_norm) or self.scaler.is_enabled()
        bad = any_true(not (loss_ok and grads_ok), self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.disc_optimizer is not None:
                self.disc_optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak += 1
            self.skipped_steps += 1
            self._advance_schedules()
            if self.nonfinite_streak >= tcfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"loss or gradients were NaN/Inf for {self.nonfinite_streak} steps in a row (step {step})",
                    "lower the learning rate, use --precision bf16 or fp32, or check the data; "
                    "the last checkpoint written is intact and --resume auto continues from it",
                )
            return StepResult(values, grad_norm, True, lr, self.micro_batch, use_disc)
        self.nonfinite_streak = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.vae)
        if self.disc_optimizer is not None and use_disc:
            self.disc_scaler.unscale_(self.disc_optimizer)
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), clip)
            self.disc_scaler.step(self.disc_optimizer)
            self.disc_scaler.update()
            self.disc_optimizer.zero_grad(set_to_none=True)
        self._advance_schedules()
        return StepResult(values, grad_norm, False, lr, self.micro_batch, use_disc)

    def _advance_schedules(self) -> None:
        """The schedules follow the global step, also over skipped steps and before the GAN starts."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
            if self.disc_scheduler is not None:
                self.disc_scheduler.step()

    def compile_report(self) -> dict:
        """Whether the step is compiled, and the graph breaks torch.compile reported so far (with reasons)."""
        return self.compile_watch.report()

    def fit_micro_batch(self, image_size: int, headroom: float = 0.85) -> int:
        """On CUDA, measure one image's training-step memory and pick the largest micro-batch that fits.

        The micro-batch divides this rank's batch so every accumulation chunk has one
        shape. An explicit ``train.micro_batch_size`` is kept as given.
        """
        if self.device.type != "cuda" or self.settings.train.micro_batch_size:
            return self.micro_batch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        x = torch.rand(1, self.settings.model.in_channels, image_size, image_size, device=self.device) * 2 - 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with self._autocast():
                # Eager: compiling a one-image graph would cost another compile; eager peaks higher.
                out = self._eager_forward(TrainBatch(x), self._latent_noise(x, 0))
                total, _ = self.loss(x, out.recon, out.mean, out.logvar, crop_offset=self._crop_offset(image_size, 0))
            total.backward()
            per_image = torch.cuda.max_memory_allocated(self.device) - base
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        del x, out, total
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        param_bytes = sum(p.numel() * 4 for p in self.vae.parameters())
        budget = free * headroom - 3 * param_bytes  # gradients + AdamW's two moments still to come
        if per_image > budget:
            raise does_not_fit(self.settings.profile, image_size, per_image / 2**30, max(budget, 0) / 2**30,
                               self.settings.train.gradient_checkpointing)
        fits = max(1, int(budget // max(per_image, 1)))
        self.micro_batch = max(
            d for d in range(1, self.per_rank_batch + 1) if self.per_rank_batch % d == 0 and d <= fits
        )
        self.log(
            f"micro-batch {self.micro_batch} x {self.per_rank_batch // self.micro_batch} accumulation "
            f"(measured {per_image / 2**30:.2f} GiB per image, {free / 2**30:.1f} GiB free)"
        )
        return self.micro_batch

    # ------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything but the weights, for a checkpoint (tensors, numbers and strings only)."""
        out = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema_updates": self.ema.updates,
            "micro_batch": self.micro_batch,
            "nonfinite_streak": self.nonfinite_streak,
            "skipped_steps": self.skipped_steps,
        }
        if self.disc_optimizer is not None:
            out["disc_optimizer"] = self.disc_optimizer.state_dict()
            out["disc_scheduler"] = self.disc_scheduler.state_dict()
            out["disc_scaler"] = self.disc_scaler.state_dict()
        return out

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.micro_batch = min(self.micro_batch, int(state.get("micro_batch", self.micro_batch)))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.disc_optimizer is not None and "disc_optimizer" in state:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
            self.disc_scheduler.load_state_dict(state["disc_scheduler"])
            self.disc_scaler.load_state_dict(state["disc_scaler"])
