"""The sampling seam: the rate limiter's gate, the uniform draw pinned to what the ring drew before
the seam existed, and a prioritized sampler plugged in through the same interface."""

import numpy as np
import pytest
import torch

from common.batch import Batch
from learner.learner import Learner
from replay_server.ring import FrameRing
from replay_server.sampler import RateLimiter, UniformSampler, sample


def filled_ring(transitions: int = 130, capacity: int = 50) -> FrameRing:
    """A ring that has wrapped: one new frame per transition, each transition's reward its global index."""
    ring = FrameRing(capacity)
    frame = np.zeros((84, 84), np.uint8)
    for t in range(transitions):
        fid = ring.add_frame(frame + t % 256)
        ring.add_transition(np.full(5, fid), np.zeros(53, np.float32), np.zeros(2, np.float32), float(t),
                            np.zeros(53, np.float32), False)
    return ring


def test_rate_limiter_semantics():
    lim = RateLimiter(min_size=100, samples_per_insert=2.0, error_buffer=50)
    assert not lim.can_sample(size=99, inserted=99, batch_size=10)
    assert lim.can_sample(size=100, inserted=100, batch_size=10)
    lim.sampled = 240
    assert lim.can_sample(size=100, inserted=100, batch_size=10)  # 250 - 200 <= 50
    assert not lim.can_sample(size=100, inserted=100, batch_size=11)
    assert RateLimiter(1, 0.0, 0.0).can_sample(size=5, inserted=0, batch_size=10**6)


def test_the_uniform_draw_is_the_one_before_the_seam():
    """Slots and generator state as `FrameRing.sample_indices` left them (recorded from that code)."""
    ring = filled_ring()
    assert (ring.tail, ring.head) == (80, 130)
    rng = np.random.default_rng(2026)
    assert UniformSampler().choose(ring, 12, rng)[0].tolist() == [22, 38, 31, 11, 48, 3, 33, 48, 12, 47, 21, 19]
    assert UniformSampler().choose(ring, 5, rng)[0].tolist() == [15, 25, 16, 38, 22]
    rng = np.random.default_rng(7)
    arrays = RateLimiter(1, 0.0, 0.0).sample(ring, 6, rng)
    assert rng.integers(0, 10**9) == 833651021, "the limiter's draw consumed the generator as before"
    expected = np.random.default_rng(7).integers(80, 130, size=6) % 50
    np.testing.assert_array_equal(arrays["indices"], expected)
    for key, value in ring.gather(expected).items():
        np.testing.assert_array_equal(arrays[key], value)
    assert "weight" not in arrays


class Prioritized:
    """A toy proportional prioritized sampler, to show what the interface carries."""

    def __init__(self, capacity: int) -> None:
        self.priority = np.ones(capacity)

    def choose(self, ring, batch_size, rng):
        live = np.arange(ring.tail, ring.head) % ring.capacity
        p = self.priority[live] / self.priority[live].sum()
        chosen = rng.choice(len(live), size=batch_size, p=p)
        weight = (len(live) * p[chosen]) ** -1.0
        return live[chosen], weight / weight.max()

    def update_priorities(self, indices, priorities):
        self.priority[indices] = priorities


def test_a_prioritized_sampler_plugs_into_the_seam():
    ring = filled_ring()
    sampler = Prioritized(ring.capacity)
    limiter = RateLimiter(1, 0.0, 0.0, sampler)
    live = np.arange(ring.tail, ring.head) % ring.capacity
    sampler.update_priorities(live, np.where(live == 7, 1e6, 1e-6))
    arrays = limiter.sample(ring, 32, np.random.default_rng(0))
    assert set(arrays["indices"].tolist()) == {7} and np.all(arrays["reward"] == arrays["reward"][0])
    batch = Batch.from_numpy(arrays, torch.device("cpu"))
    assert batch.indices.tolist() == [7] * 32 and batch.weight.dtype == torch.float32 and batch.weight.shape == (32,)


def test_batches_carry_their_slots_and_no_weight_when_uniform():
    ring = filled_ring()
    batch = Batch.from_numpy(sample(ring, 8, np.random.default_rng(1), n_step=3), torch.device("cpu"))
    assert batch.weight is None and batch.indices.shape == (8,)
    np.testing.assert_array_equal(batch.reward.numpy(), ring.gather(batch.indices, n_step=3)["reward"])


def test_the_learner_samples_through_its_limiters_sampler():
    from common.config import load_config
    from learner.td3 import TD3
    from tests.test_dashboards import Recorder

    cfg = load_config(overrides=["learner.device=cpu", "td3.batch_size=4", "td3.critic_warmup_updates=0",
                                 "replay.min_size_to_sample=4", "td3.learning_starts=0"])
    ring = filled_ring(60, 50)
    learner = Learner(TD3(cfg, torch.device("cpu")), ring, cfg, Recorder(), np.random.default_rng(0))
    chosen = []
    uniform = UniformSampler()

    class Spy(UniformSampler):
        def choose(self, ring, batch_size, rng):
            idx, weight = uniform.choose(ring, batch_size, rng)
            chosen.append(idx)
            return idx, weight

    learner.limiter.sampler = Spy()
    assert learner.ready(env_step=1)
    learner.step(env_step=1)
    assert len(chosen) == 1 and chosen[0].shape == (4,)
    with pytest.raises(ValueError, match="empty"):
        UniformSampler().choose(FrameRing(4), 1, np.random.default_rng(0))
