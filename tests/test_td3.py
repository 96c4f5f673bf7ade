import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.batch import Batch
from common.config import load_config
from learner.monitor import AdaptiveCnnLr
from learner.td3 import TD3
from tests.conftest import random_batch_arrays

CPU = torch.device("cpu")


def make_agent(*overrides: str) -> TD3:
    torch.manual_seed(0)
    return TD3(load_config(overrides=["learner.device=cpu", *overrides]), CPU)


def tiny_batch(b: int = 4, seed: int = 0, reward_scale: float = 1.0) -> Batch:
    return Batch.from_numpy(random_batch_arrays(b, seed, reward_scale), CPU)


def reference_target(agent: TD3, batch: Batch, noise: torch.Tensor | None = None) -> torch.Tensor:
    """r + gamma^k (1 - d) min(Q1', Q2') written out by hand from the target modules."""
    with torch.no_grad():
        x = batch.next_image.float() / 127.5 - 1.0
        actor_cnn = agent.critic_target.cnn if agent.cfg.actor_encoder == "critic" else agent.actor_target.cnn
        head = agent.actor_target.head
        a = torch.tanh(head.net(torch.cat([head.trunk(actor_cnn(x)), batch.next_vector], 1)))
        if noise is not None:
            a = (a + noise.clamp(-0.5, 0.5)).clamp(-1, 1)
        z = torch.cat([agent.critic_target.heads.trunk(agent.critic_target.cnn(x)), batch.next_vector, a], 1)
        qs = [q(z).squeeze(1) for q in agent.critic_target.heads.qs]
        bootstrap = torch.minimum(*qs) if len(qs) == 2 else qs[0]
        return batch.reward + batch.discount * (1 - batch.done) * bootstrap


def _critic_reference(agent: TD3, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, q1, q2) written out by hand, before any step."""
    y = reference_target(agent, batch)
    with torch.no_grad():
        z = torch.cat([agent.critic.heads.trunk(agent.critic.cnn(batch.image.float() / 127.5 - 1)), batch.vector, batch.action], 1)
        q1, q2 = (q(z).squeeze(1) for q in agent.critic.heads.qs)
    return y, q1, q2


def test_target_and_critic_loss_match_a_hand_computed_reference():
    agent = make_agent("td3.policy_noise=0.0")
    batch = tiny_batch()
    y, q1, q2 = _critic_reference(agent, batch)
    torch.testing.assert_close(agent.target_q(batch), y)
    expected_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    metrics = agent.update_critic(batch)
    assert metrics["train/critic_loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert metrics["debug/q1_mean"] == pytest.approx(float(q1.mean()), rel=1e-5)
    assert metrics["debug/td_error_q2"] == pytest.approx(float((q2 - y).abs().mean()), rel=1e-5)
    # A terminal transition does not bootstrap.
    assert float(y[1]) == pytest.approx(float(batch.reward[1]))


def test_target_smoothing_noise_is_clipped(monkeypatch):
    agent = make_agent()
    batch = tiny_batch()
    big = torch.full((4, 2), 50.0)
    monkeypatch.setattr(torch, "randn_like", lambda t: big.clone())
    # noise = 50 * 0.2 = 10, clipped to 0.5
    torch.testing.assert_close(agent.target_q(batch), reference_target(agent, batch, noise=torch.full((4, 2), 0.5)))


def test_actor_loss_is_minus_q1_of_the_policy_action():
    agent = make_agent("td3.actor_encoder=own")
    batch = tiny_batch()
    with torch.no_grad():
        x = batch.image.float() / 127.5 - 1
        a = torch.tanh(agent.actor.head.net(torch.cat([agent.actor.head.trunk(agent.actor.cnn(x)), batch.vector], 1)))
        q1 = agent.critic.heads.qs[0](torch.cat([agent.critic.heads.trunk(agent.critic.cnn(x)), batch.vector, a], 1)).squeeze(1)
    assert agent.update_actor(batch)["train/actor_loss"] == pytest.approx(-float(q1.mean()), rel=1e-5)


def _record_cnn_calls(agent: TD3) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    cnns = {"actor": agent.actor.cnn, "actor_target": agent.actor_target.cnn,
            "critic": agent.critic.cnn, "critic_target": agent.critic_target.cnn}
    for name, module in cnns.items():
        module.register_forward_hook(lambda m, inp, out, name=name: calls.append((name, inp[0].data_ptr())))
    return calls


def test_each_quantity_comes_from_the_right_cnn():
    # Without augmentation, so that each CNN's input is the batch's own tensor, told apart by its address.
    agent = make_agent("td3.augment_shift=0")
    batch = tiny_batch()
    calls = _record_cnn_calls(agent)
    agent.update_critic(batch)
    img, nxt = batch.image.data_ptr(), batch.next_image.data_ptr()
    # The default: the actor reads the critic CNN's features, its target the target critic CNN's.
    assert sorted(calls) == sorted([("critic_target", nxt), ("critic", img)])
    calls.clear()
    agent.update_actor(batch)
    assert calls == [("critic", img)]
    calls.clear()
    agent.update(batch)
    agent.update(batch)  # critic + actor: the actor reuses the critic update's features
    assert sorted(calls) == sorted([("critic_target", nxt), ("critic", img)] * 2)
    own = make_agent("td3.actor_encoder=own", "td3.augment_shift=0")
    calls = _record_cnn_calls(own)
    own.update_critic(batch)
    assert sorted(calls) == sorted([("actor_target", nxt), ("critic_target", nxt), ("critic", img)])
    calls.clear()
    own.update_actor(batch)
    assert sorted(calls) == sorted([("actor", img), ("critic", img)])


def test_target_action_ignores_the_online_cnns_and_uses_the_target_ones():
    agent = make_agent("td3.policy_noise=0.0", "td3.actor_encoder=own")
    batch = tiny_batch()
    before = agent.target_q(batch)
    with torch.no_grad():
        for p in list(agent.actor.cnn.parameters()) + list(agent.critic.cnn.parameters()):
            p.mul_(-3.0)
    torch.testing.assert_close(agent.target_q(batch), before)
    with torch.no_grad():
        agent.actor_target.cnn.fc.weight.mul_(-3.0)
    changed = agent.target_q(batch)
    assert not torch.allclose(changed, before)
    with torch.no_grad():
        agent.critic_target.cnn.fc.weight.mul_(-3.0)
    assert not torch.allclose(agent.target_q(batch), changed)


def test_targets_follow_with_polyak_averaging_on_actor_steps_only():
    agent = make_agent("td3.tau=0.3")  # large enough that a wrong factor exceeds the tolerance
    batch = tiny_batch()
    t0 = agent.critic_target.cnn.conv1.weight.clone()
    agent.update(batch)  # critic only
    torch.testing.assert_close(agent.critic_target.cnn.conv1.weight, t0)
    agent.update(batch)  # critic + actor + targets
    expected = 0.7 * t0 + 0.3 * agent.critic.cnn.conv1.weight
    torch.testing.assert_close(agent.critic_target.cnn.conv1.weight, expected)


def test_polyak_updates_leave_the_targets_without_autograd_history():
    # Recorded by autograd, each lerp chained a node onto the target parameters: the learner grew
    # by ~20 KB per update without end (the soak's 128 MB/hour).
    agent = make_agent()
    for _ in range(3):
        agent.soft_update_targets()
    for target in (agent.actor_target, agent.critic_target):
        assert all(p.grad_fn is None and not p.requires_grad for p in target.parameters())


def test_actor_loss_only_on_actor_update_steps():
    agent = make_agent("td3.critic_warmup_updates=0")
    batch = tiny_batch()
    first, second = agent.update(batch), agent.update(batch)
    assert "train/actor_loss" not in first and "gradients/actor_cnn_norm" not in first
    assert "train/actor_loss" in second and "debug/cnn_features_l2_norm" in second


def test_gradients_are_clipped_per_part_and_reported():
    agent = make_agent()
    batch = tiny_batch(reward_scale=1e4)
    metrics = agent.update_critic(batch)
    assert metrics["gradients/critic_mlp_norm"] > 10.0  # the norm before clipping
    for module in (agent.critic.cnn, agent.critic.heads):
        norm = torch.norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        assert norm <= 10.0 + 1e-3
    m = agent.update_actor(batch)
    assert "gradients/actor_mlp_norm" in m
    # On the critic's features the actor CNN gets no gradient: no flat-zero panel for it.
    assert "gradients/actor_cnn_norm" not in m
    own = make_agent("td3.actor_encoder=own")
    assert {"gradients/actor_cnn_norm", "gradients/actor_mlp_norm"} <= own.update_actor(batch).keys()
    for module in (own.actor.cnn, own.actor.head):
        assert torch.norm(torch.stack([p.grad.norm() for p in module.parameters()])) <= 1.0 + 1e-5


def test_gradient_alerts():
    agent = make_agent("learner.grad_warning_norm=1e-9", "learner.grad_critical_norm=1e9")
    metrics = agent.update(tiny_batch())
    assert metrics["alerts/gradient_explosion_warning"] == 1.0
    assert metrics["alerts/gradient_explosion_critical"] == 0.0


def test_weight_decay_and_learning_rates_per_group():
    agent = make_agent("td3.weight_decay_style=l2")
    for opt, model, head in ((agent.actor_opt, agent.actor, agent.actor.head), (agent.critic_opt, agent.critic, agent.critic.heads)):
        assert type(opt) is torch.optim.Adam
        cnn_group, mlp_group = opt.param_groups
        assert (cnn_group["name"], cnn_group["lr"], cnn_group["weight_decay"]) == ("cnn", 1e-4, 1e-4)
        assert (mlp_group["name"], mlp_group["lr"], mlp_group["weight_decay"]) == ("mlp", 3e-4, 0.0)
        assert {id(p) for p in cnn_group["params"]} == {id(p) for p in model.cnn.parameters()}
        assert {id(p) for p in mlp_group["params"]} == {id(p) for p in head.parameters()}


def test_decoupled_weight_decay_spares_layernorm_gains_and_biases():
    agent = make_agent()  # the default style
    for opt, model, head in ((agent.actor_opt, agent.actor, agent.actor.head), (agent.critic_opt, agent.critic, agent.critic.heads)):
        assert type(opt) is torch.optim.AdamW
        decayed, spared, mlp_group = opt.param_groups
        assert (decayed["name"], decayed["weight_decay"], spared["name"], spared["weight_decay"]) == ("cnn", 1e-4, "cnn", 0.0)
        assert (mlp_group["name"], mlp_group["weight_decay"]) == ("mlp", 0.0)
        cnn = dict(model.cnn.named_parameters())
        assert {id(cnn[n]) for n in ("conv1.weight", "fc.weight")} <= {id(p) for p in decayed["params"]}
        assert {id(cnn[n]) for n in ("ln1.weight", "ln4.bias", "conv1.bias")} <= {id(p) for p in spared["params"]}
        assert len(decayed["params"]) + len(spared["params"]) == len(cnn)
        assert {id(p) for p in mlp_group["params"]} == {id(p) for p in head.parameters()}


def until_checked(agent: TD3, batch: Batch) -> dict:
    """Updates on `batch` up to the guard's next restore check; that update's metrics."""
    while True:
        metrics = agent.update(batch)
        if agent.updates % agent.guard.check_every == 0:
            return metrics


def test_a_restore_copies_the_snapshot_back_and_keeps_it_apart():
    agent = make_agent("learner.nonfinite_restore_after=1")
    good, bad = tiny_batch(), tiny_batch()
    bad.reward[0] = float("nan")
    agent.update(good)  # the first snapshot
    snapshot = [t.clone() for t in agent.guard.snapshot]
    assert agent.update(bad)["alerts/weights_restored"] == 0.0  # frozen, restored at the next check
    with torch.no_grad():
        agent.critic.cnn.fc.weight.fill_(float("inf"))  # frozen updates change nothing, this stays
    assert until_checked(agent, bad)["alerts/weights_restored"] == 1.0
    for live, kept in zip(agent.state_tensors(), snapshot):
        torch.testing.assert_close(live, kept)
    agent.update(good)
    for held, kept in zip(agent.guard.snapshot, snapshot):
        torch.testing.assert_close(held, kept)  # did not drift with the live weights and Adam


def test_a_restore_keeps_the_adaptive_cnn_lr_halvings():
    agent = make_agent("learner.nonfinite_restore_after=1", "learner.feature_l2_threshold=1e-6", "learner.lr_cooldown_updates=1")
    good, bad = tiny_batch(), tiny_batch()
    bad.reward[0] = float("nan")
    agent.update(good)  # snapshot, then a halving (features above the tiny threshold)
    agent.update(good)  # a second halving, after the snapshot
    halved = agent.cnn_lr.lr
    assert agent.cnn_lr.halvings == 2 and halved == pytest.approx(1e-4 / 4)
    assert until_checked(agent, bad)["alerts/weights_restored"] == 1.0
    assert agent.cnn_lr.halvings == 2  # skipped updates do not halve
    assert agent.cnn_lr.lr == pytest.approx(halved)  # the count and the lr still agree
    assert all(float(g["lr"]) == pytest.approx(halved) for g in agent.cnn_lr.groups)


def test_heads_q_and_losses_stay_fp32_under_autocast():
    agent = make_agent()
    agent.amp = True  # bf16 autocast forced on, on the CPU
    batch = tiny_batch(reward_scale=300.0)
    y = agent.target_q(batch)
    assert y.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        features = agent.critic.cnn(batch.image)
        q_bf16 = agent.critic.heads(features, batch.vector, batch.action)[0] + 300.0
    with torch.no_grad(), agent._fp32():
        q_fp32 = agent.critic.heads(features.float(), batch.vector, batch.action)[0] + 300.0
    assert q_bf16.dtype == torch.bfloat16 and q_fp32.dtype == torch.float32
    # bf16 around 300 has a step of 2: the values the old path produced were quantized.
    assert torch.all(torch.remainder(q_bf16.float(), 2.0) == 0)
    assert not torch.all(torch.remainder(q_fp32, 2.0) == 0)
    metrics = agent.update_critic(batch)
    assert np.isfinite(metrics["train/critic_loss"])


def test_actor_lock_metrics():
    agent = make_agent()
    m = agent.update_actor(tiny_batch(b=8))
    for name in ("steer", "throttle"):
        assert 0.0 <= m[f"debug/action_saturated_{name}"] <= 1.0
        assert -1.0 <= m[f"debug/action_mean_{name}"] <= 1.0
        assert m[f"debug/action_std_{name}"] >= 0.0
    assert 0.0 <= m["debug/actor_pretanh_abs_mean"] <= m["debug/actor_pretanh_abs_max"]
    assert m["debug/dq_da_norm"] > 0.0 and m["alerts/action_saturation"] == 0.0
    assert agent.last_actions.shape == (8, 2)
    # A saturated actor: the last layer's bias pushed far past tanh's range.
    with torch.no_grad():
        agent.actor.head.net[-1].bias.fill_(-10.0)
    m = agent.update_actor(tiny_batch(b=8))
    assert m["debug/action_saturated_steer"] == 1.0 and m["alerts/action_saturation"] == 1.0
    assert m["debug/actor_pretanh_abs_max"] > 5.0


def test_pretanh_penalty_pulls_a_saturated_actor_back():
    saturated = []
    for weight in (0.0, 1.0):
        agent = make_agent(f"td3.pretanh_penalty={weight}")
        with torch.no_grad():
            agent.actor.head.net[-1].bias.fill_(-6.0)
        m = agent.update_actor(tiny_batch(b=8))
        assert m["train/pretanh_penalty"] > 0.0
        saturated.append(float(agent.actor.head.net[-1].bias.grad.abs().sum()))
    assert saturated[0] < 1e-3 < saturated[1]  # tanh at the bound has no gradient; the penalty does


@pytest.mark.parametrize("q_filter", [False, True])
def test_behaviour_cloning_pulls_the_actor_to_the_drivers_actions(q_filter):
    batch = tiny_batch(b=8)
    batch.driver = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    plain = make_agent("td3.actor_encoder=own")
    cloning = make_agent("td3.actor_encoder=own", "actors.warmup_actions=privileged", "td3.bc_weight=0.5",
                         f"td3.bc_q_filter={q_filter}")
    with torch.no_grad():
        features = cloning.critic.cnn(batch.image)
        action = cloning.actor(batch.image, batch.vector)
        q_policy = cloning.critic.heads(features, batch.vector, action)[0]
        q_replayed = cloning.critic.heads(features, batch.vector, batch.action)[0]
    cloned = batch.driver * ((q_replayed > q_policy).float() if q_filter else 1.0)
    if q_filter:
        assert 0 < cloned.sum() < batch.driver.sum(), "the filter passes some of the driver's actions, not all"
    expected_bc = (cloned * (action - batch.action).square().sum(1)).mean()
    m, p = cloning.update_actor(batch), plain.update_actor(batch)
    assert float(m["train/bc_share"]) == pytest.approx(float(cloned.mean()))
    assert float(m["train/bc_loss"]) == pytest.approx(float(expected_bc), rel=1e-5)
    scale = 0.5 * float(q_policy.abs().mean())
    assert float(m["train/actor_loss"]) == pytest.approx(float(p["train/actor_loss"]) + scale * float(expected_bc), rel=1e-4)
    assert "train/bc_loss" not in p
    unmarked = make_agent("td3.actor_encoder=own", "actors.warmup_actions=privileged", "td3.bc_weight=0.5")
    unmarked = unmarked.update_actor(tiny_batch(b=8))
    assert float(unmarked["train/bc_share"]) == 0.0, "a batch without driver marks clones nothing"


def test_teacher_labels_are_cloned_instead_of_the_action_taken():
    batch = tiny_batch(b=8)
    batch.driver = torch.ones(8)
    batch.driver_action = torch.full((8, 2), 0.5)
    agent = make_agent("td3.actor_encoder=own", "actors.teacher_labels=true", "td3.bc_weight=0.5")
    with torch.no_grad():
        action = agent.actor(batch.image, batch.vector)
    m = agent.update_actor(batch)
    assert float(m["train/bc_share"]) == 1.0
    assert float(m["train/bc_loss"]) == pytest.approx(float((action - 0.5).square().sum(1).mean()), rel=1e-5)


def test_actor_on_the_critic_encoder_leaves_the_actor_cnn_to_the_critic():
    agent = make_agent("td3.actor_encoder=critic")
    agent.update_actor(tiny_batch())
    for a, c in zip(agent.actor.cnn.parameters(), agent.critic.cnn.parameters()):
        torch.testing.assert_close(a, c)
        assert a.grad is None


def test_critic_heads_get_no_gradient_from_the_actor_loss():
    agent = make_agent()
    agent.update_actor(tiny_batch())
    assert all(p.grad is None for p in agent.critic.heads.parameters())
    assert all(p.requires_grad for p in agent.critic.heads.parameters())


def test_critic_warmup_delays_the_actor():
    agent = make_agent("td3.critic_warmup_updates=4")
    steps = [("train/actor_loss" in agent.update(tiny_batch())) for _ in range(8)]
    assert steps == [False, False, False, False, False, True, False, True]


def test_random_shift_moves_each_sample_by_whole_pixels():
    from learner.td3 import random_shift

    torch.manual_seed(0)
    frames = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    shifted = random_shift(frames, 4)
    x = frames.float() / 127.5 - 1.0
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    for i in range(16):
        matches = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.allclose(shifted[i], padded[i, :, dy:dy + 84, dx:dx + 84], atol=1e-4)]
        assert len(matches) == 1
    assert len({tuple(shifted[i, 0, 40, 40:44].tolist()) for i in range(16)}) > 1  # not one shift for all


def test_adaptive_lr_halves_with_cooldown_and_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": 1e-4, "name": "cnn"}, {"params": [], "lr": 3e-4, "name": "mlp"}])
    mon = AdaptiveCnnLr([opt], threshold=50.0, cooldown=1000, floor=1e-6)
    yes = torch.tensor(True)

    def observe(l2: float, update: int, ok: torch.Tensor = yes) -> dict[str, float]:
        return {k: float(v) for k, v in mon.observe(torch.tensor(l2), torch.tensor(update), ok).items()}

    assert observe(10.0, 1) == {"alerts/feature_explosion": 0.0, "agent/cnn_lr": pytest.approx(1e-4)}
    assert observe(60.0, 2, torch.tensor(False))["agent/cnn_lr"] == pytest.approx(1e-4)  # a skipped update
    assert observe(60.0, 2)["agent/cnn_lr"] == pytest.approx(5e-5)
    assert opt.param_groups[0]["lr"] is mon.lr_t  # what the optimizer steps with
    assert observe(60.0, 3)["agent/cnn_lr"] == pytest.approx(5e-5)  # cooling down
    assert observe(60.0, 1001)["agent/cnn_lr"] == pytest.approx(5e-5)
    assert observe(60.0, 1002)["agent/cnn_lr"] == pytest.approx(2.5e-5)
    assert opt.param_groups[1]["lr"] == 3e-4  # the MLP rate is never touched
    update = 1002
    for _ in range(20):
        update += 1000
        observe(1e9, update)
    assert mon.lr == pytest.approx(1e-6)
    assert mon.state_dict() == {"last_halving": 1002 + 5 * 1000, "halvings": 7}  # the fifth one hit the floor


def test_ddpg_has_one_critic_no_smoothing_no_delay(monkeypatch):
    agent = make_agent("td3.algo=ddpg", "td3.critic_warmup_updates=0")
    assert len(agent.critic.heads.qs) == 1
    batch = tiny_batch()
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.full_like(t, 50.0))
    torch.testing.assert_close(agent.target_q(batch), reference_target(agent, batch))
    assert "train/actor_loss" in agent.update(batch)


def test_nonfinite_loss_skips_the_update_and_restores_after_k():
    agent = make_agent("learner.nonfinite_restore_after=2")
    good = tiny_batch()
    agent.update(good)
    agent.update(good)
    before = [t.clone() for t in agent.state_tensors()]  # networks, targets, Adam state and step counts
    bad = tiny_batch()
    bad.reward[0] = float("nan")
    first = agent.update(bad)
    assert first["alerts/nonfinite_loss"] == 1.0 and first["alerts/weights_restored"] == 0.0
    assert agent.updates == 3  # counted, though it changed nothing
    for live, kept in zip(agent.state_tensors(), before):
        torch.testing.assert_close(live, kept)
    # weights corrupted by something else, then a second bad update in a row: restored at the next check
    with torch.no_grad():
        agent.critic.cnn.fc.weight.fill_(float("inf"))
    assert until_checked(agent, bad)["alerts/weights_restored"] == 1.0
    assert torch.isfinite(agent.critic.cnn.fc.weight).all()
    assert agent.update(good)["alerts/nonfinite_loss"] == 0.0
    assert int(agent.guard.skipped) == agent.guard.check_every - 2 and int(agent.guard.restored) == 1


def test_the_update_reads_nothing_back_to_the_host(monkeypatch):
    agent = make_agent("td3.critic_warmup_updates=0", "learner.nonfinite_restore_after=1")
    bad = tiny_batch()
    bad.reward[0] = float("nan")
    agent.update(tiny_batch())  # the first snapshot

    def readback(*_):
        raise AssertionError("a host readback inside the update")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, readback)
    for batch in (tiny_batch(), bad, *[bad] * agent.guard.check_every, tiny_batch()):
        agent.update(batch)  # critic and actor updates, a skipped one, a restore
    monkeypatch.undo()
    assert int(agent.guard.restored) == 1


def test_skipped_updates_are_counted_in_the_next_logged_point():
    from learner.learner import Learner
    from replay_server.ring import FrameRing

    class Recorder:
        def __init__(self):
            self.logged = []

        def log(self, metrics, step):
            self.logged.append(metrics)

        def histogram(self, *_):
            pass

    cfg = load_config(overrides=["learner.device=cpu", "td3.batch_size=4", "logging.log_interval=2"])
    torch.manual_seed(0)
    agent = TD3(cfg, CPU)
    logger = Recorder()
    learner = Learner(agent, FrameRing(16), cfg, logger, np.random.default_rng(0))
    good, bad = random_batch_arrays(4), random_batch_arrays(4)
    bad["reward"][0] = np.nan
    for arrays in (bad, good, good, bad):
        learner.limiter.sample = lambda ring, b, rng, n_step, gamma, images=True, a=arrays: a
        learner.step(env_step=7)
    first, second = logger.logged
    assert first["alerts/nonfinite_loss"] == 1 and np.isfinite(first["train/critic_loss"])
    # A logged update that was skipped logs its alerts only, no NaN loss.
    assert second["alerts/nonfinite_loss"] == 1 and "train/critic_loss" not in second


def test_uniform_critic_loss_is_the_plain_mse_bit_for_bit_and_per_weights_it():
    batch = tiny_batch()
    agent = make_agent("td3.policy_noise=0.0")
    loss, _, td, _ = agent.critic_loss(batch, agent.encode(batch))
    y = agent.target_q(batch)
    qs = agent.critic.heads(agent.encode(batch).float(), batch.vector, batch.action)
    assert torch.equal(loss, sum(F.mse_loss(q, y) for q in qs))
    y, q1, q2 = _critic_reference(agent, batch)
    torch.testing.assert_close(td, torch.maximum((q1 - y).abs(), (q2 - y).abs()))
    weighted = Batch.from_numpy({**random_batch_arrays(4, 0), "weight": np.array([1.0, 0.5, 0.25, 0.0], np.float32)}, CPU)
    loss, _, _, _ = agent.critic_loss(weighted, agent.encode(weighted))
    w = weighted.weight
    expected = (w * (q1 - y) ** 2).mean() + (w * (q2 - y) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_lap_uses_a_huber_critic_loss_and_no_weights():
    agent = make_agent("td3.policy_noise=0.0", "replay.sampler=lap", "replay.lap_min_priority=1.0")
    batch = tiny_batch(16, reward_scale=3.0)  # errors on both sides of the threshold
    y, q1, q2 = _critic_reference(agent, batch)
    loss, _, td, _ = agent.critic_loss(batch, agent.encode(batch))
    assert ((q1 - y).abs() > 1).any() and ((q1 - y).abs() < 1).any()
    expected = sum(torch.where((q - y).abs() < 1, 0.5 * (q - y) ** 2, (q - y).abs() - 0.5).mean() for q in (q1, q2))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_a_weighted_update_reads_nothing_back_either(monkeypatch):
    agent = make_agent("td3.critic_warmup_updates=0", "replay.sampler=per")
    arrays = {**random_batch_arrays(4, 0), "weight": np.array([1.0, 0.5, 0.25, 0.1], np.float32)}
    agent.update(Batch.from_numpy(arrays, CPU))

    def readback(*_):
        raise AssertionError("a host readback inside the update")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, readback)
    for _ in range(2):
        agent.update(Batch.from_numpy(arrays, CPU))
    monkeypatch.undo()
    assert agent.last_td_error.shape == (4,) and agent.last_td_error.device == CPU
