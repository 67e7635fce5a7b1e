"""The latent spaces of the VAEs people hold as single files, and the factors their diffusion models apply.

A single ``.safetensors`` VAE carries its weights, not the scaling and shift factors
the diffusion model applies to its latents (``(z - shift) * scale``): those live in the
pipeline's config (diffusers), the model's latent format (ComfyUI) or the loader's
table (InvokeAI, stable-diffusion.cpp). This table holds them for the families zturbo
knows, with the latent interface that tells them apart by shape: latent channels,
whether the quant convs exist and whether FLUX.2's BatchNorm normaliser does.

Two pairs share their shapes exactly (FLUX.1 / Z-Image with SD3; SDXL with SD1 / SD2),
so the shapes alone pick a family only for FLUX.2; see ``zturbo.model.single_file``
for what else decides.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentFamily:
    name: str
    label: str
    latent_channels: int
    quant_convs: bool
    batch_norm: bool
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    sample_size: int = 1024

    def fits(self, latent_channels: int, quant_convs: bool, batch_norm: bool) -> bool:
        return (self.latent_channels, self.quant_convs, self.batch_norm) == (latent_channels, quant_convs, batch_norm)

    @property
    def factors(self) -> str:
        """How the diffusion model normalises the latents, in a few words."""
        if self.batch_norm:
            return "BatchNorm statistics in the file"
        shift = f", shift {self.shift_factor:g}" if self.shift_factor else ""
        return f"scaling {self.scaling_factor:g}{shift}"


FAMILIES = {
    family.name: family
    for family in (
        LatentFamily("flux1", "FLUX.1 / Z-Image", 16, False, False, 0.3611, 0.1159),
        LatentFamily("sd3", "SD3 / SD3.5", 16, False, False, 1.5305, 0.0609),
        LatentFamily("sdxl", "SDXL", 4, True, False, 0.13025),
        LatentFamily("sd1", "SD1.x / SD2.x", 4, True, False, 0.18215, sample_size=512),
        LatentFamily("flux2", "FLUX.2", 32, True, True),
    )
}
# Other names people use for the same latent space.
ALIASES = {"zimage": "flux1", "z-image": "flux1", "flux": "flux1", "sd35": "sd3", "sd2": "sd1", "sd15": "sd1"}


def family_names() -> str:
    """'flux1, sd3, sdxl, sd1, flux2' (aliases left out)."""
    return ", ".join(FAMILIES)


def find_family(name: str) -> LatentFamily | None:
    key = name.strip().lower()
    return FAMILIES.get(ALIASES.get(key, key))


def fitting_families(latent_channels: int, quant_convs: bool, batch_norm: bool) -> list[LatentFamily]:
    return [f for f in FAMILIES.values() if f.fits(latent_channels, quant_convs, batch_norm)]
