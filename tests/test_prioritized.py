"""Prioritized replay (replay.sampler=per / lap) against a reference sampler: the sum-tree, draw
frequencies in proportion to priority^alpha, exact importance weights, new transitions at the
running maximum, eviction with the FIFO (by transitions and by frames), priorities handed back a
step late, a restart, chunks of many actors with n-step targets, and the learner's loop."""

import numpy as np
import pytest
import torch

from common.chunk import Chunk
from common.config import load_config
from replay_server.prioritized import PrioritizedSampler
from replay_server.ring import FrameRing
from replay_server.sampler import RateLimiter, UniformSampler, make_sampler
from replay_server.sumtree import SumTree
from tests.test_sampler import filled_ring


def chunk(actor: int, episode: int, start: int, steps: int, terminated: bool = False, truncated: bool = False) -> Chunk:
    """A chunk whose frames and rewards say where they come from (actor, episode, step)."""
    frames = np.stack([np.full((84, 84), (actor * 50 + episode * 7 + k) % 256, np.uint8)
                       for k in range(max(0, start - 3), start + steps + 1)])
    end = np.zeros(steps, bool)
    return Chunk(actor, episode, start, 0, frames, np.full((steps + 1, 53), actor, np.float32),
                 np.zeros((steps, 2), np.float32), (1000 * actor + 100 * episode + start + np.arange(steps)).astype(np.float32),
                 np.append(end[:-1], terminated), np.append(end[:-1], truncated))


def chi_square_ok(counts: np.ndarray, expected_p: np.ndarray) -> None:
    """Pearson's chi-square against `expected_p`, below the 1 - 1e-6 quantile (Wilson-Hilferty),
    and every count within 5 binomial standard deviations."""
    n, df = counts.sum(), len(counts) - 1
    expected = n * expected_p
    stat = float(((counts - expected) ** 2 / expected).sum())
    z = 4.753  # the standard normal's 1 - 1e-6 quantile
    bound = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    assert stat < bound, (stat, bound)
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - expected_p)) + 1)


# (fanout, top): the default, and small ones that make the same capacities 2 to 10 levels deep,
# with rows left partly empty where a level's size is not a multiple of the fanout
SHAPES = [{}, {"fanout": 4, "top": 8}, {"fanout": 3, "top": 2}, {"fanout": 2, "top": 1}]


@pytest.mark.parametrize("shape", SHAPES)
def test_sum_tree_matches_a_cumulative_sum(shape):
    rng = np.random.default_rng(0)
    for capacity in (1, 5, 64, 1000):
        tree, ref = SumTree(capacity, **shape), np.zeros(capacity)
        for size in (3, capacity, 7):  # small updates recompute the rows above them, large ones every row
            idx = rng.integers(0, capacity, size)
            val = rng.random(size) * (rng.random(size) > 0.3)
            tree.set(idx, val)
            for i, v in zip(idx, val):  # repeated leaves: the last value wins
                ref[i] = v
            assert tree.total == pytest.approx(ref.sum(), rel=1e-12)
            np.testing.assert_array_equal(tree[np.arange(capacity)], ref)
            if ref.sum() > 0:
                mass = rng.random(500) * ref.sum()
                expected = np.searchsorted(np.cumsum(ref), mass, side="right")
                got = tree.find(mass)
                np.testing.assert_array_equal(got, expected)
    # At or past the total (rounding), the walk still ends on a leaf > 0.
    tree = SumTree(8, **shape)
    tree.set(np.array([2, 5]), np.array([1.0, 3.0]))
    assert tree.find(np.array([0.0, 1.0, 4.0, 4.0 + 1e-9, 1e300])).tolist() == [2, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="all 0"):
        SumTree(4, **shape).find(np.zeros(1))


@pytest.mark.parametrize("shape", SHAPES)
def test_sum_tree_never_lands_on_a_leaf_of_0(shape):
    """Masses at every boundary of the cumulative sum and one ulp either side, 0 and past the
    total, over leaves mostly 0 (whole rows of 0, 0 at both ends, capacity not a multiple of the
    fanout) and of sizes 1e-12 to 1e3: each ends on a leaf > 0, and the middle of each leaf's
    interval (where the leaf is not lost in the rounding) on that leaf."""
    rng = np.random.default_rng(1)
    for capacity in (1, 3, 37, 1001):
        tree = SumTree(capacity, **shape)
        values = np.where(rng.random(capacity) < 0.2, rng.random(capacity) * 10.0 ** rng.integers(-12, 4, capacity), 0.0)
        if capacity > 2:
            values[0] = values[-1] = 0.0
        values[capacity // 2] = 0.5
        tree.set(np.arange(capacity), values)
        edges = np.cumsum(values)
        mass = np.concatenate([edges, np.nextafter(edges, 0.0), np.nextafter(edges, np.inf), [0.0, tree.total, 1e300]])
        assert np.all(values[tree.find(mass)] > 0)
        clear = np.flatnonzero(values > 1e-6 * edges[-1])
        np.testing.assert_array_equal(tree.find(edges[clear] - values[clear] / 2), clear)


def test_sum_tree_set_keeps_the_last_of_repeats_and_reads_only_its_own_copy():
    tree = SumTree(100, fanout=4, top=2)
    idx = np.array([7, 3, 7, 99, 3, 7])
    tree.set(idx, np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    idx[:] = 0  # the caller reuses its array before the sums are brought up to date
    assert tree[np.array([3, 7, 99])].tolist() == [5.0, 6.0, 4.0] and tree.total == 15.0
    tree.set(np.array([99, 99]), 0.0)
    tree.set(np.array([], np.int64), np.array([]))
    assert tree.total == 11.0 and set(tree.find(np.linspace(0, 11, 50)).tolist()) == {3, 7}


@pytest.mark.parametrize("lap", [False, True])
def test_draws_follow_priority_to_the_alpha(lap):
    """200k draws over a wrapped ring against the reference p_i^alpha / sum p^alpha."""
    ring = filled_ring(130, 50)  # live: global 80..129
    sampler = PrioritizedSampler(alpha=0.6, lap=lap)
    rng = np.random.default_rng(3)
    sampler.choose(ring, 1, rng)
    live = np.arange(ring.tail, ring.head) % ring.capacity
    td = np.random.default_rng(1).gamma(1.0, 2.0, len(live))
    sampler.drawn[live] = np.arange(ring.tail, ring.head)  # as if each had been drawn
    sampler.update_priorities(live, td)
    reference = (np.maximum(td, 1.0) if lap else td + 1e-6) ** 0.6
    np.testing.assert_allclose(sampler.tree[live], reference)
    counts = np.zeros(ring.capacity)
    for _ in range(200):
        slots, _ = sampler.choose(ring, 1000, rng)
        np.add.at(counts, slots, 1)
    chi_square_ok(counts[live], reference / reference.sum())


def test_importance_weights_are_exact_and_beta_anneals_to_one():
    ring = filled_ring(130, 50)
    sampler = PrioritizedSampler(alpha=0.5, beta0=0.4, beta_steps=10)
    rng = np.random.default_rng(0)
    sampler.choose(ring, 1, rng)
    live = np.arange(ring.tail, ring.head) % ring.capacity
    sampler.drawn[live] = np.arange(ring.tail, ring.head)
    sampler.update_priorities(live, np.arange(len(live), dtype=float))
    p = sampler.tree[np.arange(ring.capacity)]
    prob = p / p.sum()
    for updates, beta in ((1, 0.46), (5, 0.7), (10, 1.0), (50, 1.0)):
        sampler.updates = updates
        slots, weight = sampler.choose(ring, 64, rng)
        w = (len(live) * prob[slots]) ** -beta
        np.testing.assert_allclose(weight, w / w.max(), rtol=1e-12)
        assert sampler.metrics()["replay/per_beta"] == pytest.approx(beta)
    batch = RateLimiter(1, 0.0, 0.0, sampler).sample(ring, 8, rng)
    assert batch["weight"].dtype == np.float32 and batch["weight"].max() == 1.0
    assert RateLimiter(1, 0.0, 0.0, PrioritizedSampler(0.6, lap=True)).sample(ring, 8, rng).get("weight") is None


def test_new_transitions_enter_at_the_running_maximum_and_evicted_ones_leave():
    ring = FrameRing(40)
    sampler = PrioritizedSampler(alpha=1.0, eps=0.0)
    rng = np.random.default_rng(0)
    for t in range(3):
        ring.add_chunk(chunk(t, 0, 0, 10))
    slots, _ = sampler.choose(ring, 16, rng)
    assert sampler.tree.total == 30.0  # all at the initial maximum 1
    sampler.update_priorities(slots, np.full(16, 5.0))
    sampler.update_priorities(slots[:1], np.array([0.5]))  # the maximum never goes down
    assert sampler.max_priority == 5.0
    ring.add_chunk(chunk(3, 0, 0, 20))  # wraps: the oldest 10 leave, 20 arrive
    sampler.choose(ring, 1, rng)
    live = np.arange(ring.tail, ring.head) % ring.capacity
    np.testing.assert_array_equal(sampler.tree[np.arange(30, 50) % 40], 5.0)
    assert sampler.tree.total == pytest.approx(sampler.tree[live].sum())
    dead = np.setdiff1d(np.arange(40), live)
    assert np.all(sampler.tree[dead] == 0)
    drawn = np.concatenate([sampler.choose(ring, 256, rng)[0] for _ in range(20)])
    assert set(drawn.tolist()) <= set(live.tolist())


def test_frames_overwritten_evict_without_an_insert_and_are_never_drawn():
    ring = FrameRing(capacity=100, frame_capacity=30)  # frames wrap before transitions do
    sampler = PrioritizedSampler(alpha=0.6)
    rng = np.random.default_rng(0)
    for e in range(6):
        ring.add_chunk(chunk(0, e, 0, 6, terminated=True))
        drawn = sampler.choose(ring, 64, rng)[0]
        assert np.all((ring.frame_ids[drawn, 0] >= ring.frames_added - ring.frame_capacity))
        assert sampler.tree.total == pytest.approx(np.count_nonzero(sampler.tree[np.arange(100)]))
    assert ring.tail > 0 and np.count_nonzero(sampler.tree[np.arange(100)]) == len(ring)


def test_a_ring_larger_than_the_top_level_draws_only_live_slots():
    """20,000 slots: a level of rows under the tree's top. 15,000 transitions arrive and 18,000
    leave (3,000 with none in their place, as when frames wrap); the live ones cross the ring's end."""
    from tests.bench.replay import synthetic_ring

    ring = synthetic_ring(20_000)
    sampler = PrioritizedSampler(alpha=0.6)
    rng = np.random.default_rng(0)
    slots, _ = sampler.choose(ring, 256, rng)
    assert len(sampler.tree.levels) == 2
    sampler.update_priorities(slots, rng.random(256) * 5)
    ring.head += 15_000
    ring.tail += 18_000
    drawn = np.concatenate([sampler.choose(ring, 256, rng)[0] for _ in range(40)])
    live = np.arange(ring.tail, ring.head) % ring.capacity
    assert set(drawn.tolist()) <= set(live.tolist())
    assert np.count_nonzero(sampler.tree[np.arange(ring.capacity)]) == len(live) == 17_000
    assert sampler.tree.total == pytest.approx(sampler.tree[live].sum())


def test_a_late_priority_for_a_slot_refilled_or_evicted_since_is_dropped():
    ring = FrameRing(20)
    ring.add_chunk(chunk(0, 0, 0, 20))
    sampler = PrioritizedSampler(alpha=1.0, eps=0.0)
    rng = np.random.default_rng(0)
    slots, _ = sampler.choose(ring, 64, rng)
    ring.add_chunk(chunk(1, 0, 0, 5))  # global 20..24 replace slots 0..4 before the hand-back
    sampler.update_priorities(slots, np.full(64, 9.0))
    kept = np.unique(slots[slots >= 5])
    np.testing.assert_array_equal(sampler.tree[kept], 9.0)
    assert np.all(sampler.tree[np.unique(slots[slots < 5])] == 1.0)  # untouched, then new at max 9
    sampler.choose(ring, 1, rng)
    np.testing.assert_array_equal(sampler.tree[np.arange(5)], 9.0)
    before = sampler.tree[np.arange(20)].copy()
    sampler.update_priorities(np.arange(20), np.full(20, np.nan))  # not finite: ignored
    sampler.update_priorities(np.array([2]), np.array([3.0]))  # a new transition, not drawn yet
    np.testing.assert_array_equal(sampler.tree[np.arange(20)], before)


def test_many_actors_n_step_and_episode_ends_sample_what_the_ring_gathers():
    """Interleaved chunks of 3 actors, episodes ended by termination and by a time limit, a ring
    that wraps: each prioritized batch is the ring's own n-step gather of its slots."""
    ring = FrameRing(64)
    sampler = PrioritizedSampler(alpha=0.6, beta0=0.4, beta_steps=100)
    rng = np.random.default_rng(0)
    for episode in range(4):
        for start in (0, 5, 10):
            for actor in range(3):
                end = start == 10
                ring.add_chunk(chunk(actor, episode, start, 5, terminated=end and actor == 0,
                                     truncated=end and actor != 0))
            arrays = RateLimiter(1, 0.0, 0.0, sampler).sample(ring, 32, rng, n_step=3, gamma=0.9)
            expected = ring.gather(arrays["indices"], 3, 0.9)
            for key, value in expected.items():
                np.testing.assert_array_equal(arrays[key], value)
            holder = sampler._holder(arrays["indices"])
            assert np.all(holder >= ring.tail) and np.all(holder < ring.head)
            sampler.update_priorities(arrays["indices"], rng.random(32) * 10)
    assert ring.head == 4 * 3 * 3 * 5 and ring.tail == ring.head - 64


def test_a_restart_rebuilds_every_present_transition_at_priority_one():
    ring = filled_ring(130, 50)
    sampler = PrioritizedSampler(alpha=1.0)
    rng = np.random.default_rng(0)
    slots, _ = sampler.choose(ring, 32, rng)
    sampler.update_priorities(slots, np.full(32, 50.0))
    restored = FrameRing.from_state(ring.state())
    fresh = make_sampler(load_config(overrides=["replay.sampler=per"]).replay, updates=1000)
    fresh.choose(restored, 1, rng)
    live = np.arange(restored.tail, restored.head) % restored.capacity
    np.testing.assert_array_equal(fresh.tree[live], 1.0)
    assert fresh.max_priority == 1.0 and fresh.updates == 1001
    # The same sampler handed another ring starts over on it too.
    sampler.choose(restored, 1, rng)
    np.testing.assert_array_equal(sampler.tree[live], 1.0)


def test_the_factory_builds_what_the_config_names():
    replay = load_config().replay
    assert replay.sampler == "uniform" and isinstance(make_sampler(replay), UniformSampler)
    lap = make_sampler(load_config(overrides=["replay.sampler=lap", "replay.per_alpha=0.4"]).replay)
    assert lap.lap and lap.alpha == 0.4 and lap.priority(np.array([0.5, 4.0])).tolist() == [1.0, 4.0 ** 0.4]
    from common.config import ConfigError
    for bad in ("replay.per_alpha=1.5", "replay.per_beta_steps=0", "replay.per_eps=0", "replay.sampler=rank"):
        with pytest.raises(ConfigError):
            load_config(overrides=[bad])


def _learner(*overrides: str):
    from learner.learner import Learner
    from learner.td3 import TD3
    from tests.test_dashboards import Recorder

    cfg = load_config(overrides=["learner.device=cpu", "td3.batch_size=8", "td3.critic_warmup_updates=0",
                                 "replay.min_size_to_sample=8", "td3.learning_starts=0", "logging.log_interval=2",
                                 *overrides])
    torch.manual_seed(0)
    return Learner(TD3(cfg, torch.device("cpu")), filled_ring(60, 50), cfg, Recorder(), np.random.default_rng(0))


def test_the_learner_hands_the_td_errors_back_one_update_late():
    learner = _learner("replay.sampler=per", "replay.per_alpha=1.0")
    sampler = learner.limiter.sampler
    handed: list[tuple[np.ndarray, np.ndarray]] = []
    update = sampler.update_priorities
    sampler.update_priorities = lambda i, p: (handed.append((i.copy(), p.copy())), update(i, p))
    learner.step(env_step=1)
    first = (learner._pending[0].copy(), learner.agent.last_td_error.clone())
    assert handed == []  # the first update's errors wait for the second update
    learner.step(env_step=2)
    np.testing.assert_array_equal(handed[0][0], first[0])
    np.testing.assert_array_equal(handed[0][1], first[1].numpy())
    td = first[1].numpy()
    assert np.all(td >= 0) and td.std() > 0
    last = [td[np.flatnonzero(first[0] == s)[-1]] for s in first[0]]  # a slot drawn twice: its last error
    np.testing.assert_allclose(sampler.tree[first[0]], np.array(last) + 1e-6)
    logged = learner.logger.logged[-1]
    assert {"replay/priority_max", "replay/importance_weight_mean", "replay/per_beta"} <= set(logged)


def test_uniform_reads_nothing_back_and_hands_nothing_back():
    learner = _learner()
    calls = []

    class Spy(UniformSampler):
        def update_priorities(self, indices, priorities):
            calls.append(indices)

    learner.limiter.sampler = Spy()
    for step in range(3):
        learner.step(env_step=step + 1)
    assert calls == [] and learner._pending is None
    assert not any(k.startswith(("replay/priority", "replay/importance")) for k in learner.logger.logged[-1])


def test_the_bench_section_runs_on_a_small_ring():
    """`make bench-replay ARGS=--sections=prioritized`'s code path, on 1,000 slots (no figures)."""
    from tests.bench.replay import prioritized_rates, synthetic_ring

    ring = synthetic_ring(1000, episode_steps=10)
    batch = ring.gather(np.arange(1000), n_step=3, images=False)
    assert (len(ring), ring.tail) == (1000, 1000) and set(np.unique(batch["discount"]).astype(float).round(4).tolist()) <= {0.99, 0.9801, 0.9703}
    figures = prioritized_rates(capacities=(1000,), batch=16, n=5, blocks=2, host_frames=(1000,))
    assert figures["replay_per_batches_per_s_b16_1k_slots"] > 0 and 16 <= figures["replay_per_bytes_per_slot_1k_slots"] <= 48
    assert figures["replay_per_vs_uniform_ratio_1k_slots_host_frames"] > 0


@pytest.mark.parametrize("via_redis", [False, True])
def test_serial_and_distributed_learners_wire_the_same_sampler_and_restart_at_priority_one(tmp_path, via_redis):
    """Both modes build their learner in `TrainingCore`: a per sampler over the ring that the
    chunks reach (straight, or through a real redis-server's stream). A learner restarted on the
    same stream (the distributed resume: the ring comes back from Redis) draws the transitions
    Redis kept, all at priority 1."""
    from learner.core import TrainingCore

    cfg = load_config(overrides=["learner.device=cpu", "replay.sampler=per", "replay.capacity=64",
                                 "replay.min_size_to_sample=8", "td3.batch_size=8", "replay.aof=false", "replay.chunk_steps=10"])
    core = TrainingCore(cfg, tmp_path, None, via_redis)
    try:
        sampler = core.learner.limiter.sampler
        assert isinstance(sampler, PrioritizedSampler)
        for episode in range(5):
            for actor in range(2):
                core.replay.insert(chunk(actor, episode, 0, 10, terminated=True))
        core.replay.poll()
        kept = 70 if via_redis else 100  # the stream keeps ceil(capacity / chunk_steps) chunks
        assert len(core.ring) == 64 and core.ring.head == kept
        slots, _ = sampler.choose(core.ring, 256, np.random.default_rng(0))
        assert np.all(sampler._holder(slots) >= core.ring.tail)
        sampler.update_priorities(slots, np.full(256, 7.0))
        if via_redis:
            from replay_server.ingest import RedisReplay

            ring = FrameRing(cfg.replay.capacity)
            assert RedisReplay(core.replay.redis, cfg.replay.stream_key, ring, cfg.replay.max_chunk_bytes).warm_start() == kept
            fresh = make_sampler(cfg.replay)
            fresh.choose(ring, 1, np.random.default_rng(0))
            np.testing.assert_array_equal(fresh.tree[np.arange(64)], 1.0)
    finally:
        core.close()
