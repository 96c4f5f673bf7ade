"""Which transitions the learner samples, and when it may: the seam a prioritized replay plugs into.

`RateLimiter` gates sampling (Reverb's semantics) and draws each batch through a `Sampler`, which
chooses ring slots and may weight them. `UniformSampler`, the default, draws every live transition
with equal probability. A prioritized sampler implements the same two methods: `choose` returns
slots with their importance weights, and `update_priorities` receives new priorities (say |TD
error|) for slots it chose. Every batch carries its slots (`indices`) for that hand-back, and its
importance weights (`weight`) when the sampler gives some. `make_sampler` builds the one
`replay.sampler` names (replay_server/prioritized.py has per and lap), for the serial and the
distributed learner alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from common.config import ReplayConfig
from replay_server.prioritized import PrioritizedSampler
from replay_server.ring import FrameRing


class Sampler(Protocol):
    """Chooses the ring slots of a batch."""

    uses_priorities: bool
    """Whether `update_priorities` wants the TD errors (the learner reads them back only then)."""

    def choose(self, ring: FrameRing, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """`batch_size` slots of live transitions in `ring`, and their importance weights (None: all 1)."""
        ...

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities (absolute TD errors) for slots this sampler chose."""
        ...

    def metrics(self) -> dict[str, float]:
        """replay/* scalars about its draws, for the learner's log."""
        ...

    def histograms(self) -> dict[str, np.ndarray]:
        """replay/* histograms about its draws, for the learner's log."""
        ...


class UniformSampler:
    """Every live transition with equal probability, no weights."""

    uses_priorities = False

    def choose(self, ring: FrameRing, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, None]:
        if len(ring) == 0:
            raise ValueError("cannot sample from an empty replay")
        return rng.integers(ring.tail, ring.head, size=batch_size) % ring.capacity, None

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Priorities do not change a uniform draw."""

    def metrics(self) -> dict[str, float]:
        return {}

    def histograms(self) -> dict[str, np.ndarray]:
        return {}


def make_sampler(r: ReplayConfig, updates: int = 0) -> Sampler:
    """The sampler `r.sampler` names; `updates`: the learner's updates so far (beta's clock)."""
    if r.sampler == "uniform":
        return UniformSampler()
    return PrioritizedSampler(r.per_alpha, r.per_beta0, r.per_beta_steps, r.per_eps, lap=r.sampler == "lap",
                              min_priority=r.lap_min_priority, updates=updates)


def sample(ring: FrameRing, batch_size: int, rng: np.random.Generator, n_step: int = 1, gamma: float = 0.99,
           images: bool = True, sampler: Sampler | None = None) -> dict[str, np.ndarray]:
    """A batch of `ring.gather` arrays chosen by `sampler` (uniform when None), with its slots as
    "indices" and, when the sampler weights them, "weight"."""
    indices, weight = (sampler or UniformSampler()).choose(ring, batch_size, rng)
    arrays = ring.gather(indices, n_step, gamma, images)
    arrays["indices"] = indices
    if weight is not None:
        arrays["weight"] = np.asarray(weight, np.float32)
    return arrays


class RateLimiter:
    """Reverb's semantics: no sampling below `min_size`, and sampled transitions may run at most
    `error_buffer` ahead of `samples_per_insert` x inserted ones (0 disables the ratio). Only the
    learner waits; inserts are never held back."""

    def __init__(self, min_size: int, samples_per_insert: float, error_buffer: float,
                 sampler: Sampler | None = None) -> None:
        self.min_size = min_size
        self.samples_per_insert = samples_per_insert
        self.error_buffer = error_buffer
        self.sampler: Sampler = sampler or UniformSampler()
        self.sampled = 0

    def can_sample(self, size: int, inserted: int, batch_size: int) -> bool:
        if size < max(self.min_size, 1):
            return False
        if self.samples_per_insert <= 0:
            return True
        return self.sampled + batch_size - inserted * self.samples_per_insert <= self.error_buffer

    def sample(self, ring: FrameRing, batch_size: int, rng: np.random.Generator, n_step: int = 1,
               gamma: float = 0.99, images: bool = True) -> dict[str, np.ndarray]:
        self.sampled += batch_size
        return sample(ring, batch_size, rng, n_step, gamma, images, self.sampler)
