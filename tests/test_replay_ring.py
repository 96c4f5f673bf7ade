import numpy as np
import pytest

from actors.adder import ChunkAdder
from actors.envs import make_env
from common.config import load_config
from common.chunk import decode, encode
from replay_server.ring import FrameRing
from replay_server.sampler import UniformSampler, sample


def record(steps: int, max_episode_steps: int = 15, seed: int = 0):
    """Drives the real embedded env and returns (transitions, episodes)."""
    env = make_env(load_config(overrides=[f"env.max_episode_steps={max_episode_steps}"]))
    rng = np.random.default_rng(seed)
    transitions, episodes = [], 0
    obs, _ = env.reset(seed=seed)
    episodes += 1
    resets = [obs]
    for _ in range(steps):
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        nxt, reward, terminated, truncated, _ = env.step(action)
        transitions.append((obs, action, np.float32(reward), nxt, terminated, truncated))
        obs = nxt
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + episodes)
            episodes += 1
            resets.append(obs)
    env.close()
    return transitions, resets


def fill(ring: FrameRing, transitions, resets, chunk_steps: int = 8) -> None:
    """The serial path: a ChunkAdder feeding the ring directly."""
    adder = ChunkAdder(actor_id=0, chunk_steps=chunk_steps, sink=ring.add_chunk)
    resets = iter(resets)
    adder.reset(next(resets))
    for obs, action, reward, nxt, terminated, truncated in transitions:
        adder.add(action, float(reward), nxt, terminated, truncated)
        if terminated or truncated:
            adder.reset(next(resets))
    adder.flush()


def assert_same(got: dict, expected: tuple) -> None:
    obs, action, reward, nxt, terminated, _ = expected
    np.testing.assert_array_equal(got["image"], obs["image"])
    np.testing.assert_array_equal(got["next_image"], nxt["image"])
    np.testing.assert_array_equal(got["vector"], obs["vector"])
    np.testing.assert_array_equal(got["next_vector"], nxt["vector"])
    np.testing.assert_array_equal(got["action"], action)
    assert got["reward"] == reward and got["done"] == float(terminated)


@pytest.fixture(scope="module")
def recorded():
    return record(120)


def test_every_transition_round_trips_bit_for_bit(recorded):
    transitions, resets = recorded
    ring = FrameRing(capacity=1000)
    fill(ring, transitions, resets)
    assert len(ring) == len(transitions)
    # each frame stored once: one per step plus one per episode start
    assert ring.frames_added == len(transitions) + len(resets)
    for i, expected in enumerate(transitions):
        got = {k: v[0] for k, v in ring.gather(np.array([i])).items()}
        assert_same(got, expected)


def test_truncation_bootstraps_and_termination_does_not(recorded):
    transitions, resets = recorded
    ring = FrameRing(capacity=1000)
    fill(ring, transitions, resets)
    truncated = [i for i, t in enumerate(transitions) if t[5]]
    assert truncated, "the recording should contain time-limit truncations"
    assert all(ring.done[i] == 0.0 for i in truncated)


def test_fifo_eviction_keeps_the_newest(recorded):
    transitions, resets = recorded
    ring = FrameRing(capacity=50)
    fill(ring, transitions, resets)
    assert len(ring) == 50
    live = range(ring.tail, ring.head)
    for g in live:
        got = {k: v[0] for k, v in ring.gather(np.array([g % ring.capacity])).items()}
        assert_same(got, transitions[g])
    idx, _ = UniformSampler().choose(ring, 500, np.random.default_rng(0))
    assert set(idx) <= {g % 50 for g in live}


def test_frame_pressure_evicts_transitions_before_their_frames_are_overwritten(recorded):
    transitions, resets = recorded
    ring = FrameRing(capacity=100, frame_capacity=40)
    fill(ring, transitions, resets)
    assert 0 < len(ring) <= 40
    oldest_frame = ring.frames_added - ring.frame_capacity
    assert ring.frame_ids[ring.tail % ring.capacity, 0] >= oldest_frame
    for g in range(ring.tail, ring.head):
        got = {k: v[0] for k, v in ring.gather(np.array([g % ring.capacity])).items()}
        assert_same(got, transitions[g])


def test_state_round_trip(recorded, tmp_path):
    transitions, resets = recorded
    ring = FrameRing(capacity=80)
    fill(ring, transitions, resets)
    np.savez(tmp_path / "r.npz", **ring.state())
    with np.load(tmp_path / "r.npz", allow_pickle=False) as data:
        again = FrameRing.from_state({k: data[k] for k in data.files})
    idx = np.arange(80)
    for k, v in ring.gather(idx).items():
        np.testing.assert_array_equal(again.gather(idx)[k], v)
    assert (again.head, again.tail, again.frames_added) == (ring.head, ring.tail, ring.frames_added)


def test_driver_marks_travel_from_the_adder_to_the_batch_and_an_old_state_has_none(recorded, tmp_path):
    """The transitions a driver acted in (warm-up, guided episodes) are marked through the chunk's
    flags, the ring and its saved state; a ring saved before the marks loads with none."""
    transitions, resets = recorded
    ring = FrameRing(capacity=200)
    adder = ChunkAdder(actor_id=0, chunk_steps=8, sink=lambda c: ring.add_chunk(decode(encode(c))))
    resets_left = iter(resets)
    adder.reset(next(resets_left))
    for k, (obs, action, reward, nxt, terminated, truncated) in enumerate(transitions):
        adder.add(action, float(reward), nxt, terminated, truncated, driver=k % 3 == 0)
        if terminated or truncated:
            adder.reset(next(resets_left))
    adder.flush()
    idx = np.arange(len(transitions))
    np.testing.assert_array_equal(ring.gather(idx)["driver"], (idx % 3 == 0).astype(np.float32))
    state = ring.state()
    np.testing.assert_array_equal(FrameRing.from_state(state).gather(idx)["driver"], ring.gather(idx)["driver"])
    np.testing.assert_array_equal(ring.gather(idx)["driver_action"], ring.gather(idx)["action"])
    del state["driver"], state["driver_action"]
    assert not FrameRing.from_state(state).gather(idx)["driver"].any()


def test_teacher_labels_travel_from_the_adder_to_the_batch_on_every_transition(recorded):
    """With `actors.teacher_labels`, every transition carries the teacher's action (the chunk's
    teacher section): it is what is cloned, on the policy's transitions too, and it survives a save."""
    transitions, resets = recorded
    ring = FrameRing(capacity=200)
    adder = ChunkAdder(actor_id=0, chunk_steps=8, sink=lambda c: ring.add_chunk(decode(encode(c))))
    resets_left = iter(resets)
    adder.reset(next(resets_left))
    labels = np.stack([np.array([k / 100, -k / 100], np.float32) for k in range(len(transitions))])
    for k, (obs, action, reward, nxt, terminated, truncated) in enumerate(transitions):
        adder.add(action, float(reward), nxt, terminated, truncated, driver=k % 3 == 0, teacher=labels[k])
        if terminated or truncated:
            adder.reset(next(resets_left))
    adder.flush()
    idx = np.arange(len(transitions))
    batch = ring.gather(idx)
    assert batch["driver"].all(), "every transition has the teacher's action"
    np.testing.assert_array_equal(batch["driver_action"], labels)
    np.testing.assert_array_equal(FrameRing.from_state(ring.state()).gather(idx)["driver_action"], labels)


def test_empty_ring_refuses_to_sample():
    with pytest.raises(ValueError, match="empty"):
        sample(FrameRing(10), 4, np.random.default_rng(0))


def expected_n_step(transitions, i: int, n: int, gamma: float):
    """The n-step target's inputs for recorded transition i, computed from the recording alone."""
    reward, discount, j = 0.0, 1.0, i
    while True:
        reward += discount * float(transitions[j][2])
        discount *= gamma
        if j - i + 1 == n or transitions[j][4] or transitions[j][5] or j + 1 == len(transitions):
            return reward, discount, transitions[j]
        j += 1


@pytest.mark.parametrize("n", [1, 3, 5])
def test_n_step_returns_follow_one_episode_across_chunks_and_interleaved_actors(recorded, n):
    """Two actors' chunks interleave in the ring; each sample sums only its own episode's rewards."""
    transitions, resets = recorded
    assert any(t[4] for t in transitions) and any(t[5] for t in transitions)
    shifted = [(o, a + 10.0, r + 100.0, x, te, tr) for o, a, r, x, te, tr in transitions]
    ring = FrameRing(capacity=1000)
    adders = [ChunkAdder(actor_id=k, chunk_steps=4, sink=ring.add_chunk) for k in range(2)]
    streams = [transitions, shifted]
    starts = [iter(resets), iter(resets)]
    for k in range(2):
        adders[k].reset(next(starts[k]))
    for step in range(len(transitions)):
        for k in range(2):  # one step each, so the two episodes' chunks alternate in the ring
            _, action, reward, nxt, terminated, truncated = streams[k][step]
            adders[k].add(action, float(reward), nxt, terminated, truncated)
            if terminated or truncated:
                adders[k].reset(next(starts[k]))
    for adder in adders:
        adder.flush()
    gamma = 0.9
    got = ring.gather(np.arange(len(ring)), n_step=n, gamma=gamma)
    for slot in range(len(ring)):
        stream = shifted if got["action"][slot, 0] > 5 else transitions
        i = int(np.flatnonzero(np.array([t[1][0] for t in stream]) == got["action"][slot, 0])[0])
        reward, discount, last = expected_n_step(stream, i, n, gamma)
        assert got["reward"][slot] == pytest.approx(reward, rel=1e-5)
        assert got["discount"][slot] == pytest.approx(discount, rel=1e-6)
        assert got["done"][slot] == float(last[4])
        np.testing.assert_array_equal(got["next_image"][slot], last[3]["image"])
        np.testing.assert_array_equal(got["next_vector"][slot], last[3]["vector"])
        np.testing.assert_array_equal(got["image"][slot], stream[i][0]["image"])


def test_n_step_stops_where_the_next_transition_was_evicted_or_never_came(recorded):
    transitions, resets = recorded
    ring = FrameRing(capacity=30)
    fill(ring, transitions, resets)
    newest = (ring.head - 1) % ring.capacity
    got = ring.gather(np.array([newest]), n_step=5, gamma=0.5)
    assert got["discount"][0] == pytest.approx(0.5)  # its successor has not arrived: one step
    state = ring.state()
    del state["successor"]  # a checkpoint written before n-step links: loads, samples one step
    old = FrameRing.from_state(state).gather(np.arange(len(ring)), n_step=5, gamma=0.5)
    np.testing.assert_array_equal(old["reward"], ring.reward[np.arange(len(ring))])


def test_a_device_copy_of_the_frames_gives_the_same_batches(recorded):
    import torch

    from common.batch import Batch
    from learner.device_frames import DeviceFrames

    transitions, resets = recorded
    ring = FrameRing(capacity=40)  # 120 transitions: the frame store wraps around three times
    mirror = DeviceFrames(ring, torch.device("cpu"))
    adder = ChunkAdder(actor_id=0, chunk_steps=8, sink=ring.add_chunk)
    resets_left = iter(resets)
    adder.reset(next(resets_left))
    rng = np.random.default_rng(0)
    for i, (obs, action, reward, nxt, terminated, truncated) in enumerate(transitions):
        adder.add(action, float(reward), nxt, terminated, truncated)
        if terminated or truncated:
            adder.reset(next(resets_left))
        if i % 13 == 12 and len(ring):  # batches between inserts, as the learner takes them
            idx, _ = UniformSampler().choose(ring, 16, rng)
            want = Batch.from_numpy(ring.gather(idx, n_step=3), torch.device("cpu"))
            got = mirror.batch(ring.gather(idx, n_step=3, images=False))
            for field in ("image", "next_image", "vector", "next_vector", "action", "reward", "done", "discount"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    assert mirror.synced == ring.frames_added


def test_the_learner_samples_through_the_device_copy_when_asked(recorded, tmp_path):
    import torch

    from common.metrics import MetricLogger
    from learner.learner import Learner
    from learner.td3 import TD3

    transitions, resets = recorded
    ring = FrameRing(capacity=200)
    fill(ring, transitions, resets)
    cfg = load_config(overrides=["learner.device=cpu", "learner.replay_on_device=true", "td3.batch_size=8",
                                 "replay.min_size_to_sample=8", "td3.learning_starts=0"])
    learner = Learner(TD3(cfg, torch.device("cpu")), ring, cfg, MetricLogger(tmp_path), np.random.default_rng(0))
    assert learner.ready(env_step=len(ring))
    assert learner.step(env_step=len(ring))["alerts/nonfinite_loss"] == 0.0
    assert learner.device_frames.synced == ring.frames_added
