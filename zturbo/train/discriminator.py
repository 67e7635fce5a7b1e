"""PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``).

Architecture only: the hinge losses and the adaptive weight live in
``zturbo.train.losses``. Each output logit judges one overlapping patch
(70x70 receptive field with the default 3 layers).
"""

from __future__ import annotations

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    """conv(4, s2) -> LeakyReLU, then ``n_layers`` conv -> BatchNorm -> LeakyReLU, then a 1-channel conv."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # The DCGAN initialisation the reference discriminator uses.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
