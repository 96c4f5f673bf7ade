"""The TD3 update's non-finite guard, on the device: no host readback, no Python branch on a
value the device computed, so the update stays capturable (`learner.compile`).

An update whose loss or gradient is not finite has its optimizer step masked (fused Adam's
`found_inf`) and its target update weighted by 0: nothing changes. After `restore_after` such
updates in a row the guard *freezes* the update (every step masked) until its next check, at
most `check_every` updates later, puts back the last good snapshot; the frozen updates change
nothing, so the weights come back exactly as if the restore had happened at once. The snapshot
is refreshed every `snapshot_every` updates when the latest one was good. Snapshot and restore
are `torch.where` copies over every tensor of the networks and optimizers (on the host's
schedule; each is a pass over the model's memory, hence not every update).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def where_copy_(cond: Tensor, dst: list[Tensor], src: list[Tensor]) -> None:
    """dst[i] = src[i] where `cond` (a 0-d bool), else unchanged."""
    for d, s in zip(dst, src):
        d.copy_(torch.where(cond, s, d))


class NonFiniteGuard:
    """Counts bad updates on the device; freezes, snapshots and restores `tensors()`."""

    def __init__(self, tensors: Callable[[], list[Tensor]], restore_after: int, device: torch.device,
                 check_every: int = 10, snapshot_every: int = 100) -> None:
        self.tensors = tensors
        self.restore_after = restore_after
        self.check_every = check_every
        self.snapshot_every = snapshot_every
        self.where_copy_ = where_copy_
        """Replaced by its compiled version under `learner.compile`."""
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.frozen = torch.zeros((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        """Updates skipped, since the start of this process."""
        self.restored = torch.zeros((), dtype=torch.int64, device=device)
        """Restores, since the start of this process."""
        self.snapshot: list[Tensor] | None = None

    @property
    def allowed(self) -> Tensor:
        """0-d bool: may this update step at all."""
        return ~self.frozen

    def record(self, ok: Tensor) -> None:
        """After each update: `ok`, did it step."""
        self.streak.copy_(torch.where(ok, 0, self.streak + 1))
        self.frozen |= self.streak >= self.restore_after
        self.skipped += (~ok).long()

    @torch.no_grad()
    def maintain(self, updates: int) -> Tensor:
        """After each update, `updates` counting it: the restore check and the snapshot, each on
        its schedule. Returns 1.0 (0-d) when this call restored the snapshot."""
        restored = torch.zeros((), device=self.frozen.device)
        check, refresh = updates % self.check_every == 0, updates % self.snapshot_every == 0
        if not (check or refresh or self.snapshot is None):
            return restored
        live = self.tensors()
        fresh = self.snapshot is None or len(self.snapshot) != len(live)
        if check and not fresh:
            restored = self.frozen.float()
            self.where_copy_(self.frozen, live, self.snapshot)
            self.streak.masked_fill_(self.frozen, 0)
            self.restored += self.frozen.long()
            self.frozen.zero_()
        if fresh:
            # The first update, or optimizer state that a checkpoint load changed: a plain copy.
            self.snapshot = [t.detach().clone() for t in live]
        elif refresh:
            self.where_copy_((self.streak == 0) & ~self.frozen, self.snapshot, live)
        return restored

    def forget(self) -> None:
        """Drops the snapshot (after a checkpoint load: it would hold the weights from before)."""
        self.snapshot = None
