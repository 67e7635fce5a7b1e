"""Training losses: reconstruction, LPIPS, KL and the PatchGAN hinge terms.

Done the way the reference (taming-transformers / latent-diffusion) intends:
LPIPS takes part in the graph (gradients flow through it), the KL is summed per
sample, the generator's GAN term is scaled by an adaptive weight balancing its
gradient against the reconstruction gradient at the decoder's last layer, and
the discriminator only ever sees detached reconstructions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.config import LossConfig
from zturbo.errors import UsageError


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    recon, target = recon.float(), target.float()
    if kind == "l2":
        return F.mse_loss(recon, target)
    return F.l1_loss(recon, target)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dimensions, averaged over the batch."""
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3]).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """||dNLL/dW|| / ||dG/dW|| at the decoder's last layer, clamped to [0, max_weight], detached."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)
    weight = torch.nan_to_num(weight, nan=0.0, posinf=max_weight)
    return torch.clamp(weight, 0.0, max_weight).detach()


def generator_loss(discriminator: nn.Module, recon: torch.Tensor) -> torch.Tensor:
    """The generator's GAN term: minus the discriminator's mean logit on the reconstructions."""
    return -discriminator(recon).float().mean()


def check_lpips_size(size: int | None, height: int, width: int) -> None:
    if size is not None and size > min(height, width):
        raise UsageError(
            f"loss.lpips_size={size} is larger than the {height}x{width} training images",
            f"set loss.lpips_size to at most {min(height, width)}, or leave it unset for full-resolution LPIPS",
        )


def perceptual_view(
    recon: torch.Tensor, target: torch.Tensor, size: int | None, view: str, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (recon, target) pair LPIPS sees: full resolution (``size`` None or the image's own),
    area-downsampled to ``size`` ("resize"), or the ``size`` square whose top-left corner is
    ``offset`` ("crop"; a (2,) integer tensor, so a compiled graph does not specialise on it)."""
    h, w = recon.shape[-2:]
    check_lpips_size(size, h, w)
    if size is None or (size == h and size == w):
        return recon, target
    if view == "crop":
        span = torch.arange(size, device=recon.device)
        start = offset.to(recon.device) if offset is not None else torch.zeros(2, dtype=torch.long, device=recon.device)
        rows, cols = start[0] + span, start[1] + span

        def crop(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(-2, rows).index_select(-1, cols)

        return crop(recon), crop(target)
    # Area interpolation averages whole source pixels (no aliasing) and is differentiable.
    return (F.interpolate(recon, size=(size, size), mode="area"), F.interpolate(target, size=(size, size), mode="area"))


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator on real images and *detached* reconstructions.

    Real and fake go through one forward pass (one DDP forward per backward).
    """
    logits = discriminator(torch.cat([real.detach(), recon.detach()]))
    logits_real, logits_fake = logits.chunk(2)
    return hinge_d_loss(logits_real, logits_fake)


class VAELoss(nn.Module):
    """The generator-side objective; returns the total and each term (detached) for logging."""

    def __init__(self, config: LossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.perceptual = perceptual

    def reconstruction_terms(
        self,
        target: torch.Tensor,
        recon: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        crop_offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(nll, kl, detached terms): everything but the GAN term (the part the trainer compiles as one graph).

        ``crop_offset`` places the LPIPS square when ``lpips_view`` is "crop".
        """
        cfg = self.config
        rec = reconstruction_loss(recon, target, cfg.reconstruction_loss)
        nll = cfg.reconstruction_weight * rec
        terms = {"rec": rec.detach()}
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            r, t = perceptual_view(recon, target.to(recon.dtype), cfg.lpips_size, cfg.lpips_view, crop_offset)
            p = self.perceptual(r, t).float().mean()
            nll = nll + cfg.perceptual_weight * p
            terms["lpips"] = p.detach()
        kl = kl_loss(mean, logvar)
        terms["kl"] = kl.detach()
        terms["nll"] = nll.detach()
        return nll, kl, terms

    def combine(
        self, nll: torch.Tensor, kl: torch.Tensor, terms: dict[str, torch.Tensor], g: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The total: ``nll + kl_weight * kl`` (+ the adaptively weighted GAN term ``g``); adds g's terms."""
        cfg = self.config
        total = nll + cfg.kl_weight * kl
        if g is not None:
            if last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_gan_weight(nll, g, last_layer, cfg.adaptive_weight_max)
            else:
                weight = torch.ones((), device=g.device)
            total = total + cfg.disc_weight * weight * g
            terms["g"] = g.detach()
            terms["d_weight"] = weight
        return total

    def forward(
        self,
        target: torch.Tensor,
        recon: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        *,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
        crop_offset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll, kl, terms = self.reconstruction_terms(target, recon, mean, logvar, crop_offset)
        g = generator_loss(discriminator, recon) if discriminator is not None else None
        return self.combine(nll, kl, terms, g, last_layer), terms
