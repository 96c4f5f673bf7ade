"""Feature-norm monitoring with an adaptive CNN learning rate.

The seeds' version halved the CNN learning rate on every update whose *batch* norm exceeded the
threshold, so one bad stretch drove it to zero. Here the signal is the mean per-sample L2 norm,
a halving waits `cooldown` updates after the previous one, and the rate never drops below
`floor`.
"""

from __future__ import annotations

import torch


class AdaptiveCnnLr:
    """Halves the learning rate of every 'cnn' parameter group when features grow too large."""

    def __init__(
        self, optimizers: list[torch.optim.Optimizer], threshold: float, cooldown: int, floor: float, factor: float = 0.5
    ) -> None:
        self.optimizers = optimizers
        self.threshold = threshold
        self.cooldown = cooldown
        self.floor = floor
        self.factor = factor
        self.last_halving: int | None = None
        self.halvings = 0

    @property
    def groups(self) -> list[dict]:
        # Looked up each time: Optimizer.load_state_dict replaces the group dicts.
        return [g for opt in self.optimizers for g in opt.param_groups if g.get("name") == "cnn"]

    @property
    def lr(self) -> float:
        return float(self.groups[0]["lr"])

    def observe(self, feature_l2: float, update: int) -> dict[str, float]:
        exploded = feature_l2 > self.threshold
        cooled = self.last_halving is None or update - self.last_halving >= self.cooldown
        if exploded and cooled and self.lr > self.floor:
            new_lr = max(self.lr * self.factor, self.floor)
            for group in self.groups:
                group["lr"] = new_lr
            self.last_halving = update
            self.halvings += 1
        return {"alerts/feature_explosion": float(exploded), "agent/cnn_lr": self.lr}

    def state_dict(self) -> dict[str, int | None]:
        return {"last_halving": self.last_halving, "halvings": self.halvings}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self.last_halving = state["last_halving"]
        self.halvings = int(state["halvings"] or 0)
