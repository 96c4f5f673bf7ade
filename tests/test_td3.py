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
    """r + gamma (1 - d) min(Q1', Q2') written out by hand from the target modules."""
    with torch.no_grad():
        x = batch.next_image.float() / 127.5 - 1.0
        a = torch.tanh(agent.actor_target.head.net(torch.cat([agent.actor_target.cnn(x), batch.next_vector], 1)))
        if noise is not None:
            a = (a + noise.clamp(-0.5, 0.5)).clamp(-1, 1)
        z = torch.cat([agent.critic_target.cnn(x), batch.next_vector, a], 1)
        qs = [q(z).squeeze(1) for q in agent.critic_target.heads.qs]
        return batch.reward + 0.99 * (1 - batch.done) * torch.minimum(*qs) if len(qs) == 2 else batch.reward + 0.99 * (1 - batch.done) * qs[0]


def test_target_and_critic_loss_match_a_hand_computed_reference():
    agent = make_agent("td3.policy_noise=0.0")
    batch = tiny_batch()
    y = reference_target(agent, batch)
    torch.testing.assert_close(agent.target_q(batch), y)
    with torch.no_grad():
        z = torch.cat([agent.critic.cnn(batch.image.float() / 127.5 - 1), batch.vector, batch.action], 1)
        q1, q2 = (q(z).squeeze(1) for q in agent.critic.heads.qs)
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
    agent = make_agent()
    batch = tiny_batch()
    with torch.no_grad():
        x = batch.image.float() / 127.5 - 1
        a = torch.tanh(agent.actor.head.net(torch.cat([agent.actor.cnn(x), batch.vector], 1)))
        q1 = agent.critic.heads.qs[0](torch.cat([agent.critic.cnn(x), batch.vector, a], 1)).squeeze(1)
    assert agent.update_actor(batch)["train/actor_loss"] == pytest.approx(-float(q1.mean()), rel=1e-5)


def _record_cnn_calls(agent: TD3) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    cnns = {"actor": agent.actor.cnn, "actor_target": agent.actor_target.cnn,
            "critic": agent.critic.cnn, "critic_target": agent.critic_target.cnn}
    for name, module in cnns.items():
        module.register_forward_hook(lambda m, inp, out, name=name: calls.append((name, inp[0].data_ptr())))
    return calls


def test_each_quantity_comes_from_the_right_cnn():
    agent = make_agent()
    batch = tiny_batch()
    calls = _record_cnn_calls(agent)
    agent.update_critic(batch)
    img, nxt = batch.image.data_ptr(), batch.next_image.data_ptr()
    assert sorted(calls) == sorted([("actor_target", nxt), ("critic_target", nxt), ("critic", img)])
    calls.clear()
    agent.update_actor(batch)
    assert sorted(calls) == sorted([("actor", img), ("critic", img)])


def test_target_action_ignores_the_online_cnns_and_uses_the_target_ones():
    agent = make_agent("td3.policy_noise=0.0")
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
    agent = make_agent()
    batch = tiny_batch()
    t0 = agent.critic_target.cnn.conv1.weight.clone()
    agent.update(batch)  # critic only
    torch.testing.assert_close(agent.critic_target.cnn.conv1.weight, t0)
    agent.update(batch)  # critic + actor + targets
    expected = 0.995 * t0 + 0.005 * agent.critic.cnn.conv1.weight
    torch.testing.assert_close(agent.critic_target.cnn.conv1.weight, expected)


def test_actor_loss_only_on_actor_update_steps():
    agent = make_agent()
    batch = tiny_batch()
    first, second = agent.update(batch), agent.update(batch)
    assert "train/actor_loss" not in first and "gradients/actor_cnn_norm" not in first
    assert "train/actor_loss" in second and "debug/cnn_features_l2_norm" in second


def test_gradients_are_clipped_per_part_and_reported():
    agent = make_agent()
    batch = tiny_batch(reward_scale=1e4)
    metrics = agent.update_critic(batch)
    assert metrics["gradients/critic_mlp_norm_before_clip"] > 10.0
    assert metrics["gradients/critic_mlp_norm"] == 10.0
    for module in (agent.critic.cnn, agent.critic.heads):
        norm = torch.norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        assert norm <= 10.0 + 1e-3
    m = agent.update_actor(batch)
    for part in ("cnn", "mlp"):
        assert m[f"gradients/actor_{part}_norm"] <= 1.0 + 1e-6


def test_gradient_alerts():
    agent = make_agent("learner.grad_warning_norm=1e-9", "learner.grad_critical_norm=1e9")
    metrics = agent.update(tiny_batch())
    assert metrics["alerts/gradient_explosion_warning"] == 1.0
    assert metrics["alerts/gradient_explosion_critical"] == 0.0


def test_weight_decay_and_learning_rates_per_group():
    agent = make_agent()
    for opt, model, head in ((agent.actor_opt, agent.actor, agent.actor.head), (agent.critic_opt, agent.critic, agent.critic.heads)):
        cnn_group, mlp_group = opt.param_groups
        assert (cnn_group["name"], cnn_group["lr"], cnn_group["weight_decay"]) == ("cnn", 1e-4, 1e-4)
        assert (mlp_group["name"], mlp_group["lr"], mlp_group["weight_decay"]) == ("mlp", 3e-4, 0.0)
        assert {id(p) for p in cnn_group["params"]} == {id(p) for p in model.cnn.parameters()}
        assert {id(p) for p in mlp_group["params"]} == {id(p) for p in head.parameters()}


def test_adaptive_lr_halves_with_cooldown_and_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": 1e-4, "name": "cnn"}, {"params": [], "lr": 3e-4, "name": "mlp"}])
    mon = AdaptiveCnnLr([opt], threshold=50.0, cooldown=1000, floor=1e-6)
    assert mon.observe(10.0, 1) == {"alerts/feature_explosion": 0.0, "agent/cnn_lr": 1e-4}
    assert mon.observe(60.0, 2)["agent/cnn_lr"] == pytest.approx(5e-5)
    assert mon.observe(60.0, 3)["agent/cnn_lr"] == pytest.approx(5e-5)  # cooling down
    assert mon.observe(60.0, 1001)["agent/cnn_lr"] == pytest.approx(5e-5)
    assert mon.observe(60.0, 1002)["agent/cnn_lr"] == pytest.approx(2.5e-5)
    assert opt.param_groups[1]["lr"] == 3e-4  # the MLP rate is never touched
    update = 1002
    for _ in range(20):
        update += 1000
        mon.observe(1e9, update)
    assert mon.lr == pytest.approx(1e-6)


def test_ddpg_has_one_critic_no_smoothing_no_delay(monkeypatch):
    agent = make_agent("td3.algo=ddpg")
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
    snapshot = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    bad = tiny_batch()
    bad.reward[0] = float("nan")
    first = agent.update(bad)
    assert first["alerts/nonfinite_loss"] == 1.0 and first["alerts/weights_restored"] == 0.0
    assert agent.updates == 2
    for k, v in agent.critic.state_dict().items():
        torch.testing.assert_close(v, snapshot[k])  # nothing changed
    # weights corrupted by something else, then a second bad update in a row: restore
    with torch.no_grad():
        agent.critic.cnn.fc.weight.fill_(float("inf"))
    second = agent.update(bad)
    assert second["alerts/weights_restored"] == 1.0
    assert torch.isfinite(agent.critic.cnn.fc.weight).all()
    assert agent.update(good)["alerts/nonfinite_loss"] == 0.0


def test_a_skipped_update_is_always_logged():
    from learner.learner import Learner
    from replay_server.ring import FrameRing
    from tests.conftest import random_batch_arrays

    class Recorder:
        def __init__(self):
            self.logged = []

        def log(self, metrics, step):
            self.logged.append(metrics)

    cfg = load_config(overrides=["learner.device=cpu", "td3.batch_size=4", "logging.log_interval=1000"])
    torch.manual_seed(0)
    agent = TD3(cfg, CPU)
    logger = Recorder()
    learner = Learner(agent, FrameRing(16), cfg, logger, np.random.default_rng(0))
    bad = random_batch_arrays(4)
    bad["reward"][0] = np.nan
    learner.limiter.sample = lambda ring, b, rng: bad
    learner.step(env_step=7)
    assert logger.logged and logger.logged[0]["alerts/nonfinite_loss"] == 1.0
