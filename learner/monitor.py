"""Feature-norm monitoring with an adaptive CNN learning rate.

The seeds' version halved the CNN learning rate on every update whose *batch* norm exceeded the
threshold, so one bad stretch drove it to zero. Here the signal is the mean per-sample L2 norm,
a halving waits `cooldown` updates after the previous one, and the rate never drops below
`floor`.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEVER = -(2**62)
"""`last_halving` before the first halving."""


class AdaptiveCnnLr:
    """Halves the learning rate of every 'cnn' parameter group when features grow too large.

    On the device: the groups share one 0-d lr tensor (fused Adam reads it at each step), and
    `observe` changes it with `torch.where`, so the update never reads a feature norm back."""

    def __init__(
        self, optimizers: list[torch.optim.Optimizer], threshold: float, cooldown: int, floor: float, factor: float = 0.5
    ) -> None:
        self.optimizers = optimizers
        self.threshold = threshold
        self.cooldown = cooldown
        self.floor = floor
        self.factor = factor
        device = self.groups[0]["params"][0].device
        self.lr_t = torch.tensor(float(self.groups[0]["lr"]), device=device)
        self.last_halving = torch.tensor(NEVER, device=device)
        self.halvings_t = torch.zeros((), dtype=torch.int64, device=device)
        self._install()

    def _install(self) -> None:
        for group in self.groups:
            group["lr"] = self.lr_t

    @property
    def groups(self) -> list[dict]:
        # Looked up each time: Optimizer.load_state_dict replaces the group dicts.
        return [g for opt in self.optimizers for g in opt.param_groups if g.get("name") == "cnn"]

    @property
    def lr(self) -> float:
        return float(self.lr_t)

    @property
    def halvings(self) -> int:
        return int(self.halvings_t)

    def observe(self, feature_l2: Tensor, update: Tensor, ok: Tensor) -> dict[str, Tensor]:
        """`feature_l2` of update number `update` (0-d tensors); `ok`: that update stepped."""
        exploded = (feature_l2 > self.threshold) & ok
        cooled = update - self.last_halving >= self.cooldown
        halve = exploded & cooled & (self.lr_t > self.floor)
        self.lr_t.copy_(torch.where(halve, (self.lr_t * self.factor).clamp(min=self.floor), self.lr_t))
        self.last_halving.copy_(torch.where(halve, update, self.last_halving))
        self.halvings_t += halve.long()
        return {"alerts/feature_explosion": exploded.float(), "agent/cnn_lr": self.lr_t.clone()}

    def state_dict(self) -> dict[str, int | None]:
        last = int(self.last_halving)
        return {"last_halving": None if last == NEVER else last, "halvings": self.halvings}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        """After the optimizers' own load_state_dict, which left a plain float lr in each group."""
        self.last_halving.fill_(NEVER if state["last_halving"] is None else int(state["last_halving"]))
        self.halvings_t.fill_(int(state["halvings"] or 0))
        self.lr_t.fill_(float(self.groups[0]["lr"]))
        self._install()
