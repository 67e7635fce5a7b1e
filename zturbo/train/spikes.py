"""A loss term against "droplets": activation spikes that steer GroupNorm's statistics.

GroupNorm divides each group of channels by its standard deviation over the whole image,
so a network cannot say how strong a feature should be in absolute terms: every group
leaves the norm with unit variance. A network that needs to (a decoder turning a texture
it cannot reproduce into a flat, low-contrast grey, say) can still do it by planting a
strong spike in a few pixels: the spike then holds most of the group's variance and the
normalisation shrinks everything else by as much as it likes. The spike passes through
the following layers and ends as a coloured, ringed blob in the output (StyleGAN2's
"droplet"; the demo showed it on gravel, grass, brick and flat backgrounds, one blob
per image, inflating the decoder's normalising deviations 2-6x).

The tell is the shape of a group's distribution: a spike that holds most of its variance
in a few pixels makes the kurtosis E[d^4] / E[d^2]^2 (d: deviation from the group mean)
run into the hundreds, where natural feature maps stay in the tens. ``SpikePenalty``
measures it on the input of every GroupNorm during the training forward and adds
``mean(relu(kurtosis / KURTOSIS_LIMIT - 1))`` over layers, images and groups: zero for
ordinary statistics, growing with a spike. The model is unchanged (still diffusers'
AutoencoderKL); only training differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Freshly initialised demo models and droplet-free trained ones stay under 30 on every bundled
# photo; the maps with droplets reached 78 to 1000 (benchmarks/bench_droplets.py).
KURTOSIS_LIMIT = 30.0


def group_kurtosis(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G) kurtosis of each group's values of a (B, C, ...) tensor, in float32."""
    d = x.float().reshape(x.shape[0], groups, -1)
    d = d - d.mean(dim=2, keepdim=True)
    second = d.square().mean(dim=2)
    return d.square().square().mean(dim=2) / second.square().clamp(min=1e-12)


class SpikePenalty:
    """Records the spike term of every trainable GroupNorm's input while ``recording()`` is open.

        penalty = SpikePenalty(vae)
        with penalty.recording():
            recon = vae(x)
        loss = loss + weight * penalty.collect()

    Only the forward inside ``recording()`` counts: gradient checkpointing runs the layers
    again during the backward, and those calls must not add terms. Calls without autograd
    (evaluation, sampling) are not measured at all.
    """

    def __init__(self, model: nn.Module, limit: float = KURTOSIS_LIMIT):
        self.limit = limit
        self._active = False
        self._terms: list[torch.Tensor] = []
        self._handles = [
            module.register_forward_pre_hook(self._record)
            for module in model.modules()
            if isinstance(module, nn.GroupNorm) and module.weight is not None and module.weight.requires_grad
        ]
        if not self._handles:
            raise ValueError("the model has no trainable GroupNorm to watch")

    def _record(self, module: nn.GroupNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        # Computed on every call with autograd, kept only inside recording(): a checkpointed layer's
        # recompute must save the same tensors as its forward did, or the backward refuses to run.
        term = (group_kurtosis(inputs[0], module.num_groups) / self.limit - 1.0).clamp(min=0).mean()
        if self._active:
            self._terms.append(term)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def collect(self) -> torch.Tensor:
        """The mean term over the GroupNorm calls recorded since the last collect (0 if none)."""
        terms, self._terms = self._terms, []
        if not terms:
            raise RuntimeError("no GroupNorm input was recorded: run the forward inside recording()")
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
