r"""Exponential moving average of model weights.

After every optimizer step, :math:`\bar\theta \leftarrow d_t \bar\theta + (1 - d_t)\theta`
with the warm-up :math:`d_t = \min(d, (1 + t) / (10 + t))` (``t`` = number of updates so far),
as in mace-torch (via ``torch_ema``), so the average is not dominated by the random
initialisation early on. Buffers are copied, not averaged. Evaluation and the saved model use
the averaged weights.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    def __init__(self, model: torch.nn.Module, decay: float = 0.99, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        for s, p in zip(self.shadow, model.parameters()):
            s.mul_(d).add_(p.detach(), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s)

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module):
        """Temporarily swap the averaged weights into ``model``."""
        backup = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for b, p in zip(backup, model.parameters()):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
