"""An exponential moving average of the weights, evaluated and saved beside the raw weights.

Averaging the iterates of a noisy optimizer lands nearer the middle of the valley it bounces
around (Polyak averaging); for small, over-fitting models that often scores better on
held-out text than the last iterate. The decay warms up as min(decay, (1 + n) / (10 + n))
after n updates, so the average is not dominated by the initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, model.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones after."""
        params = list(model.parameters())
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw, strict=True):
                    p.copy_(r)

    def averaged_state(self, model: torch.nn.Module) -> dict:
        """The model's state_dict with the averaged weights in place of its own."""
        with self.swapped_in(model):
            return {k: v.clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("the averaged weights do not fit the model")
        self.updates = int(state["updates"])
        self.shadow = [s.to(t.device, t.dtype) for s, t in zip(state["shadow"], self.shadow,
                                                               strict=True)]
