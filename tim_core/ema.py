"""Exponential moving average of a model's weights, with a warm-up so that its horizon fits short runs.

A fixed decay of 0.999 over a ~1,500-step CPU run averages in the first, noisy weights and samples noise
(docs/method.md section 9); with warm-up the decay at update n is min(decay, (1 + n) / (10 + n)).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copies of a model's floating-point parameters and buffers, kept in float32.

    ``update(model)`` after each optimizer step; ``copy_to(model)`` to sample with the averaged weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1); got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        state = model.state_dict()
        for k, v in self.shadow.items():
            v.lerp_(state[k].detach().float(), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture), in the model's dtypes."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model; differing keys: {sorted(missing)[:5]}")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
