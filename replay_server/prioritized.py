"""Prioritized replay over the frame-once ring: proportional PER (Schaul et al. 2016, as Ape-X
samples) and LAP (Fujimoto et al. 2020), behind the `Sampler` seam.

The sampler follows the ring instead of being told about inserts: the ring is FIFO, so its live
transitions are exactly the global indices [tail, head), and before each draw the sampler zeroes
the slots of transitions that left since its last look and gives those that arrived the running
maximum priority (`_sync`). Whatever fills the ring (serial inserts, the Redis ingest, a warm
start after a restart, a ring restored from a checkpoint) is covered the same way.

A fresh sampler (a new run, or a learner restart: the ring comes back from the checkpoint or from
Redis, the priorities do not) gives every transition present the initial maximum priority 1, so
they start out equally likely; each gets its own priority the first time it is drawn and
updated, and the running maximum grows again from the priorities the critic reports.

Priorities come back one update late (the learner reads the TD errors of an update after it
queued the next one, so the device never waits for the host); by then the ring may have evicted
a drawn transition and put a new one in its slot. Each slot therefore remembers which transition
(global index) it held when last drawn, and an update for a slot whose transition has changed or
left is dropped.
"""

from __future__ import annotations

import numpy as np

from replay_server.ring import FrameRing
from replay_server.sumtree import SumTree

HISTOGRAM_SLOTS = 4096
"""Live slots (evenly spaced over the ring) the priority histogram shows: cheap at any capacity."""


class PrioritizedSampler:
    """Draws slots in proportion to their priority; `lap` floors the priorities at `min_priority`
    and gives no importance weights, per weights each draw by (N P(i))^-beta over the batch's
    largest such weight (the normalization of Fujimoto et al.'s PER for TD3: no min-tree)."""

    uses_priorities = True

    def __init__(self, alpha: float, beta0: float = 0.4, beta_steps: int = 1, eps: float = 1e-6, lap: bool = False,
                 min_priority: float = 1.0, updates: int = 0) -> None:
        self.alpha = alpha
        self.beta0 = beta0
        self.beta_steps = beta_steps
        self.eps = eps
        self.lap = lap
        self.min_priority = min_priority
        self.updates = updates
        """Batches drawn so far (the learner's updates at the start): beta's clock."""
        self.max_priority = 1.0
        """Running maximum of the tree's values (priority^alpha): what a new transition gets."""
        self.ring: FrameRing | None = None
        self.tree = SumTree(1)
        self.drawn = np.zeros(0, np.int64)
        """Per slot, the global index of the transition it held when last drawn."""
        self.tail = self.head = 0
        """The ring's [tail, head) at the last `_sync`."""
        self.last_weight: np.ndarray | None = None
        """The last batch's importance weights (per), and the beta they were made with."""
        self.last_beta = beta0

    @property
    def beta(self) -> float:
        return min(1.0, self.beta0 + (1.0 - self.beta0) * self.updates / self.beta_steps)

    def _sync(self, ring: FrameRing) -> None:
        if ring is not self.ring or ring.capacity != self.tree.capacity or ring.head < self.head:
            self.ring, self.tree = ring, SumTree(ring.capacity)
            self.drawn = np.full(ring.capacity, -1, np.int64)
            self.tail = self.head = ring.tail
            self.max_priority = 1.0
        cap = ring.capacity
        left = np.arange(self.tail, min(ring.tail, self.head)) % cap
        arrived = np.arange(max(self.head, ring.tail), ring.head) % cap
        self.tree.set(left, 0.0)  # first: a slot can lose its transition and get a new one
        self.tree.set(arrived, self.max_priority)
        self.tail, self.head = ring.tail, ring.head

    def choose(self, ring: FrameRing, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        if len(ring) == 0:
            raise ValueError("cannot sample from an empty replay")
        self._sync(ring)
        # sorted masses read the tree in address order (faster); a batch's order means nothing
        slots = self.tree.find(np.sort(rng.random(batch_size)) * self.tree.total)
        self.drawn[slots] = self._holder(slots)
        beta = self.beta
        self.updates += 1
        if self.lap:
            return slots, None
        p = self.tree[slots]
        weight = (p.min() / p) ** beta  # = (N P(i))^-beta / max over the batch
        self.last_weight, self.last_beta = weight, beta
        return slots, weight

    def _holder(self, slots: np.ndarray) -> np.ndarray:
        """The global index of the newest transition that went into each slot."""
        head = self.ring.head
        return head - 1 - (head - 1 - slots) % self.ring.capacity

    def priority(self, td_error: np.ndarray) -> np.ndarray:
        """The tree's value for an absolute TD error."""
        td = np.abs(np.asarray(td_error, np.float64))
        return (np.maximum(td, self.min_priority) if self.lap else td + self.eps) ** self.alpha

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """`priorities`: absolute TD errors of the transitions drawn at `indices`. Dropped for a
        slot whose transition left or was replaced since, and where not finite."""
        if self.ring is None:
            return
        indices = np.asarray(indices, np.int64)
        value = self.priority(priorities)
        holder = self._holder(indices)
        keep = (self.drawn[indices] == holder) & (holder >= self.ring.tail) & np.isfinite(value)
        if keep.any():
            self.tree.set(indices[keep], value[keep])
            self.max_priority = max(self.max_priority, float(value[keep].max()))

    def metrics(self) -> dict[str, float]:
        """replay/* scalars of the priorities and of the last batch's importance weights."""
        live = self.head - self.tail
        out = {"replay/priority_max": self.max_priority,
               "replay/priority_mean": self.tree.total / live if live else 0.0}
        if self.last_weight is not None:
            out |= {"replay/importance_weight_mean": float(self.last_weight.mean()),
                    "replay/importance_weight_min": float(self.last_weight.min()), "replay/per_beta": self.last_beta}
        return out

    def histograms(self) -> dict[str, np.ndarray]:
        """The priorities of up to `HISTOGRAM_SLOTS` live slots, and the last batch's weights."""
        live = self.head - self.tail
        if not live:
            return {}
        spread = np.unique(np.linspace(self.tail, self.head - 1, min(live, HISTOGRAM_SLOTS)).astype(np.int64))
        out = {"replay/priority": self.tree[spread % self.tree.capacity]}
        if self.last_weight is not None:
            out["replay/importance_weight"] = self.last_weight
        return out

    def nbytes(self) -> int:
        """Host memory of the priorities: the tree and the per-slot record of draws."""
        return self.tree.nbytes + self.drawn.nbytes
