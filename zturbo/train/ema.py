"""Exponential moving average of model weights, kept in fp32 as a ready-to-use model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of the model whose weights trail the trained ones.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early
    averages are not dominated by the random initialisation (short runs matter).
    ``ema.model`` is what evaluation, the sample grid and export use.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        shadow = list(self.model.parameters())
        live = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(shadow, live, 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state, strict=True)
        self.updates = updates
