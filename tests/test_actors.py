"""Acting: several envs per rollout actor, with one batched policy forward per step."""

import numpy as np
import pytest
import torch

from actors.actor import Actor, acting_device, inference_dtype
from actors.adder import ChunkAdder
from actors.baseline import baseline_for
from actors.envs import eval_slot, make_env, noise_scale, rollout_slot
from actors.runner import EpisodeRunner, VectorRunner
from common.config import ConfigError, load_config
from common.networks import policy_for

CPU = torch.device("cpu")
K = 3
ROUNDS = 70  # the random start (20 steps), then the policy; short episodes, so resets are covered


def make_runner(cfg, policy, slot: int, chunks: list) -> EpisodeRunner:
    seed = 1000 * (slot + 1)
    actor = Actor(policy, cfg, np.random.default_rng(seed), CPU, noise_scale=0.5 + slot)
    adder = ChunkAdder(actor_id=slot, chunk_steps=16, sink=chunks.append)
    return EpisodeRunner(make_env(cfg, slot=slot), actor, adder, seed)


def test_k_envs_in_one_actor_make_the_transitions_of_k_separate_actors():
    # Episodes end at the lane's edge: random actions that wander into the next lane (legal with
    # env.lane_change) let a batched forward's 1e-6 difference flip a pixel there and grow (an
    # action 0.003 apart after 15 steps in the other lane).
    cfg = load_config(overrides=["td3.learning_starts=20", "env.max_episode_steps=25", "env.lane_change=false"])
    torch.manual_seed(0)
    policy = policy_for(cfg).eval()
    separate: list[list] = [[] for _ in range(K)]
    for slot in range(K):
        runner = make_runner(cfg, policy, slot, separate[slot])
        for step in range(ROUNDS):
            runner.step(step * K)
        runner.adder.flush()
        runner.env.close()
    together: list[list] = [[] for _ in range(K)]
    vector = VectorRunner([make_runner(cfg, policy, slot, together[slot]) for slot in range(K)])
    episodes = 0
    for step in range(ROUNDS):
        episodes += len(vector.step(step * K))
    for runner in vector.runners:
        runner.adder.flush()
        runner.env.close()
    assert episodes >= K  # every env finished at least one episode
    for slot in range(K):
        assert len(together[slot]) == len(separate[slot]) > 0
        for a, b in zip(together[slot], separate[slot]):
            assert (a.actor_id, a.episode_id - together[slot][0].episode_id, a.start_step) == \
                (b.actor_id, b.episode_id - separate[slot][0].episode_id, b.start_step)
            # A batched forward may sum in another order than a batch of one: float tolerance.
            np.testing.assert_allclose(a.actions, b.actions, atol=1e-5)
            np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-4)
            np.testing.assert_allclose(a.rewards, b.rewards, atol=1e-4)
            assert (a.terminated == b.terminated).all() and (a.truncated == b.truncated).all()
            assert np.mean(a.frames != b.frames) < 0.01


def test_baseline_warmup_drives_the_route_with_exploration_noise():
    # white noise: its per-episode mean and std are what the gaps below check
    cfg = load_config(overrides=["actors.warmup_actions=baseline", "td3.learning_starts=1000",
                                 "env.embedded.traffic=[0,0,0]", "actors.expl_noise_exponent=[0,0]"])
    env = make_env(cfg, training=True)
    actor = Actor(policy_for(cfg).eval(), cfg, np.random.default_rng(0), CPU)
    reference = baseline_for(cfg, env.backend.dt)
    try:
        for episode in range(2):  # the PID's state restarts with each episode, as the reference's does
            obs, _ = env.reset(seed=episode)
            actor.on_episode_start()
            reference.reset()
            gaps = []
            for step in range(200):
                action = actor.select_action(obs, step)
                gaps.append(action - np.clip(reference(obs), -1.0, 1.0))
                obs, _, terminated, truncated, info = env.step(action)
                assert not (terminated or truncated), info["termination"]
            assert actor.last_policy_action is None
            assert info["progress"] > 120.0, "the warm-up drives through the first curve"
            steer_gap = np.array(gaps)[:, 0]
            assert abs(steer_gap.mean()) < 0.03 and 0.07 < steer_gap.std() < 0.13  # noise of std 0.1
    finally:
        env.close()


def test_privileged_warmup_overtakes_the_traffic_in_the_way():
    """Scenario 1's blocker: the privileged warm-up changes lanes around it (the replay holds an
    overtake), and it needs the env's truth to do so."""
    cfg = load_config(overrides=["env.scenario=1", "actors.warmup_actions=privileged", "td3.learning_starts=2000",
                                 "actors.expl_noise_start=0.05"])
    env = make_env(cfg, training=True)
    evaluating = Actor(policy_for(cfg).eval(), cfg, np.random.default_rng(0), CPU)  # as the evaluator's
    obs, _ = env.reset(seed=0)
    assert evaluating.eval_action(obs).shape == (2,)
    with pytest.raises(ValueError, match="needs the env's surroundings"):
        evaluating.select_action(obs, 0)
    actor = Actor(policy_for(cfg).eval(), cfg, np.random.default_rng(0), CPU, surroundings=env.backend.surroundings)
    try:
        obs, _ = env.reset(seed=0)
        actor.on_episode_start()
        invasions = 0
        for step in range(1000):
            obs, _, terminated, truncated, info = env.step(actor.select_action(obs, step))
            invasions += info["lane_invasion"]
            if terminated or truncated:
                break
        assert info["termination"] == "route_completed" and invasions >= 2
    finally:
        env.close()


def test_guided_episodes_are_driven_by_the_warmup_driver_after_learning_starts():
    cfg = load_config(overrides=["actors.warmup_actions=baseline", "td3.learning_starts=0", "actors.guide_fraction=0.5",
                                 "env.embedded.traffic=[0,0,0]", "actors.expl_noise_start=0", "actors.expl_noise_end=0"])
    env = make_env(cfg, training=True)
    actor = Actor(policy_for(cfg).eval(), cfg, np.random.default_rng(0), CPU, surroundings=env.backend.surroundings)
    reference = baseline_for(cfg, env.backend.dt)
    try:
        guided = []
        for episode in range(12):
            obs, _ = env.reset(seed=episode)
            actor.on_episode_start()
            reference.reset()
            action = actor.select_action(obs, 10_000)
            driver = np.clip(reference(obs), -1.0, 1.0)
            assert actor.driver_acted == actor.guided
            if actor.guided:
                np.testing.assert_allclose(action, driver, atol=1e-6)
                assert actor.last_policy_action is None
            else:
                np.testing.assert_allclose(action, actor.policy_action(obs), atol=1e-6)
            guided.append(actor.guided)
        assert 0 < sum(guided) < len(guided), "about half the episodes are guided, drawn per episode"
    finally:
        env.close()
    with pytest.raises(ValueError, match="actors.guide_fraction=0.5 needs a driver"):
        load_config(overrides=["actors.guide_fraction=0.5"])
    with pytest.raises(ValueError, match="td3.bc_weight=0.5 clones a driver's actions"):
        load_config(overrides=["td3.bc_weight=0.5"])


@pytest.mark.parametrize("warmup", ["uniform", "privileged"])
def test_teacher_labels_every_step_with_the_privileged_drivers_action(warmup):
    """With `actors.teacher_labels`, each step's chunk row holds what the privileged driver would do
    in the state the actor is in, whoever acts (the policy, the warm-up); the driver's state
    advances once a step, so a privileged warm-up's action is the label plus noise."""
    cfg = load_config(overrides=["env.scenario=1", "actors.teacher_labels=true", "td3.bc_weight=0.4",
                                 f"actors.warmup_actions={warmup}", "td3.learning_starts=30",
                                 "actors.expl_noise_start=0", "actors.expl_noise_end=0"])
    chunks: list = []
    env = make_env(cfg, training=True)
    actor = Actor(policy_for(cfg).eval(), cfg, np.random.default_rng(0), CPU, surroundings=env.backend.surroundings)
    runner = EpisodeRunner(env, actor, ChunkAdder(actor_id=0, chunk_steps=16, sink=chunks.append), seed=0)
    reference = baseline_for(cfg, env.backend.dt, env.backend.surroundings)
    episode = -1
    try:
        for step in range(60):
            if runner.episodes != episode:
                episode = runner.episodes
                reference.reset()
            expected = np.clip(reference(runner.obs), -1.0, 1.0)
            runner.step(step)
            np.testing.assert_allclose(actor.last_teacher_action, expected, atol=1e-6)
        runner.adder.flush()
    finally:
        env.close()
    teacher = np.concatenate([c.teacher for c in chunks])
    actions = np.concatenate([c.actions for c in chunks])
    assert teacher.shape == (60, 2) and np.abs(teacher).max() <= 1.0
    assert np.allclose(actions[:30], teacher[:30], atol=1e-6) == (warmup == "privileged")
    with pytest.raises(ValueError, match="actors.teacher_labels labels the replay.*td3.bc_weight"):
        load_config(overrides=["actors.teacher_labels=true"])


def test_slots_and_noise_scales_spread_over_every_env_of_the_run():
    cfg = load_config(overrides=["actors.num_actors=3", "actors.envs_per_actor=2"])
    slots = [rollout_slot(cfg, i, j) for i in range(3) for j in range(2)]
    assert slots == list(range(6)) and eval_slot(cfg) == 6
    scales = [noise_scale(cfg, slot) for slot in slots]
    assert scales[0] == pytest.approx(0.5) and scales[-1] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(scales, scales[1:]))
    assert scales == [0.5 * 4 ** (i / 5) for i in range(6)]  # geometric, exactly as before
    assert noise_scale(cfg, 7) == scales[1], "an elastic actor's envs past the spread repeat it from its start"
    alone = load_config(overrides=["actors.num_actors=1"])
    assert noise_scale(alone, 0) == 1.0, "one env: the geometric mean of 0.5 and 2"


def test_a_vector_runner_needs_a_runner():
    with pytest.raises(ValueError, match="at least one"):
        VectorRunner([])


def test_actors_run_the_policy_on_their_device_and_name_a_missing_gpu(monkeypatch):
    assert acting_device(load_config()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="actors.num_gpus > 0"):
        load_config(overrides=["actors.device=cuda"])
    cfg = load_config(overrides=["actors.device=cuda", "actors.num_gpus=0.25"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="actors.device=cuda but this actor process sees no CUDA device"):
        acting_device(cfg)


def test_a_bfloat16_policy_takes_float32_weights_and_acts_within_1e_2_of_them(monkeypatch, caplog):
    from common.weights import load_policy_bytes, policy_to_bytes

    cfg = load_config(overrides=["actors.inference_dtype=bfloat16"])
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert inference_dtype(cfg, CPU) == torch.bfloat16
    assert "emulated and slower than float32" in caplog.text
    monkeypatch.undo()
    torch.manual_seed(0)
    full = policy_for(cfg).eval()
    half = policy_for(cfg).eval().to(CPU, inference_dtype(cfg, CPU))
    load_policy_bytes(half, policy_to_bytes(full))  # what a rollout actor's weight fetch does
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    env = make_env(cfg)
    obs, _ = env.reset(seed=3)
    observations = []
    for _ in range(8):
        observations.append(obs)
        obs, *_ = env.step(np.array([0.0, 0.5], np.float32))
    env.close()
    exact = Actor(full, cfg, np.random.default_rng(0), CPU).policy_actions(observations)
    fast = Actor(half, cfg, np.random.default_rng(0), CPU).policy_actions(observations)
    assert fast.dtype == np.float32 and fast.shape == (8, 2)
    np.testing.assert_allclose(fast, exact, atol=1e-2)


@pytest.mark.parametrize("exponents", [[0, 0], [1, 1], [1, 0], [0, 2]])
def test_exploration_noise_colour(exponents):
    """Pink and red noise (exponents 1, 2) hold an offset from one step to the next; white noise
    (0) does not. Each action dimension has its own colour and the configured std, and a new
    episode draws a new sequence."""
    cfg = load_config(overrides=["td3.learning_starts=0", "actors.expl_noise_start=0.2", "actors.expl_noise_end=0.2",
                                 f"actors.expl_noise_exponent={exponents}"])
    actor = Actor(policy_for(cfg).eval(), cfg, np.random.default_rng(0), CPU)
    zero = np.zeros(2, np.float32)

    def episode() -> np.ndarray:
        actor.on_episode_start()
        return np.array([actor.select_action({}, 0, policy_action=zero) for _ in range(cfg.env.max_episode_steps)])

    first, second = episode(), episode()
    for d, beta in enumerate(exponents):
        lag1 = np.corrcoef(first[:-1, d], first[1:, d])[0, 1]
        assert (0.5 < lag1) if beta else (abs(lag1) < 0.15), (d, beta, lag1)
        # Coloured noise's low frequencies make one episode's std itself vary: a looser bound.
        assert 0.08 < first[:, d].std() < 0.32, (d, beta)
    assert not np.allclose(first, second)


def test_exploration_noise_exponents_are_checked():
    with pytest.raises(ConfigError, match="actors.expl_noise_exponent"):
        load_config(overrides=["actors.expl_noise_exponent=[1]"])
