"""TD3 (and DDPG) with separate, normalized actor and critic CNNs, each with a target copy.

The target action comes from the *target actor CNN + target actor head*; the target Q values
from the *target critic CNN + target critic heads*. When the actor reads the critic's features
(`td3.actor_encoder=critic`, the default) the target actor head reads the target critic CNN's
too, and the actor update reuses the features the critic update computed (DrQ-v2's arrangement):
two CNN forward passes per update fewer. The old system computed the target action with the
online critic's CNN and had no target CNNs; `tests/test_td3.py` pins down which CNN feeds which
quantity.

The update is tensors in, tensors out: its metrics are 0-d tensors on the learner's device, read
back only by a caller that logs them (`read_back`), and its non-finite guard works on the device
(`learner/guard.py`). With no host sync and no Python branch on a computed value, `learner.compile`
can compile it (`learner/compiled.py`); speed wraps this file, it does not fork it.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.batch import Batch
from common.config import Config, TD3Config
from common.driving import ACTION_NAMES, vector_dim
from common.networks import Critic, Policy, frames_to_float, policy_for
from learner.compiled import compile_update
from learner.guard import NonFiniteGuard
from learner.monitor import AdaptiveCnnLr

Metrics = dict[str, Tensor | float]
SATURATED = 0.99  # |action| beyond which an action component counts as saturated (tanh(2.65))


def _optimizer(model: Policy | Critic, t: TD3Config, device: torch.device) -> torch.optim.Optimizer:
    """'cnn' groups (own lr, weight decay) and an 'mlp' group (no weight decay).

    `l2` (the seeds'): Adam's L2 weight_decay on every CNN parameter. `decoupled`: AdamW's decay on
    the CNN's conv and linear weights only; LayerNorm gains and all biases are not decayed."""
    head = model.head if isinstance(model, Policy) else model.heads
    mlp = {"params": list(head.parameters()), "lr": t.mlp_lr, "weight_decay": 0.0, "name": "mlp"}
    fused = True  # on CPU too: fused Adam's found_inf masks a non-finite step on the device
    if t.weight_decay_style == "l2":
        cnn = {"params": list(model.cnn.parameters()), "lr": t.cnn_lr, "weight_decay": t.cnn_weight_decay, "name": "cnn"}
        return torch.optim.Adam([cnn, mlp], fused=fused)
    # By module, not by shape: the conv LayerNorms' gains are (C, H, W) tensors.
    weights = [m.weight for m in model.cnn.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    others = [p for p in model.cnn.parameters() if all(p is not w for w in weights)]
    return torch.optim.AdamW([
        {"params": weights, "lr": t.cnn_lr, "weight_decay": t.cnn_weight_decay, "name": "cnn"},
        {"params": others, "lr": t.cnn_lr, "weight_decay": 0.0, "name": "cnn"},
        mlp,
    ], fused=fused)


def random_shift(frames: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ-v2's augmentation: (B, C, H, W) uint8 frames -> float in [-1, 1], each sample padded by
    `pad` (replicate) and cropped back at its own random integer offset."""
    x = F.pad(frames_to_float(frames), (pad, pad, pad, pad), mode="replicate")
    n, _, h, _ = frames.shape
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, device=x.device)[:h]
    arange = arange.unsqueeze(0).expand(h, h).unsqueeze(2)
    base = torch.cat([arange, arange.transpose(1, 0)], dim=2).unsqueeze(0)
    shift = torch.randint(0, 2 * pad + 1, (n, 1, 1, 2), device=x.device, dtype=x.dtype) * (2.0 / (h + 2 * pad))
    return F.grid_sample(x, base + shift, padding_mode="zeros", align_corners=False)


def _clip(prefix: str, parts: dict[str, nn.Module], max_norm: float) -> dict[str, Tensor]:
    """Clips each part's gradients separately; reports each norm before clipping (after it is
    min(norm, max_norm)). Only the parts that train have one (not the actor's CNN when it reads
    the critic's features: no flat-zero panel)."""
    return {f"gradients/{prefix}_{name}_norm": nn.utils.clip_grad_norm_(m.parameters(), max_norm)
            for name, m in parts.items()}


def feature_stats(prefix: str, features: Tensor) -> dict[str, Tensor]:
    f = features.detach().float()
    return {
        f"debug/{prefix}features_l2_norm": f.norm(dim=1).mean(),
        f"debug/{prefix}feature_mean": f.mean(),
        f"debug/{prefix}feature_std": f.std(),
        f"debug/{prefix}feature_min": f.min(),
        f"debug/{prefix}feature_max": f.max(),
    }


def action_stats(z: Tensor, action: Tensor) -> dict[str, Tensor]:
    """What shows an action lock before it costs a run: the pre-tanh magnitude, the saturated
    fraction, mean and std per action dimension (|dQ/da| comes after the backward pass)."""
    saturated = (action.abs() > SATURATED).float().mean(dim=0)
    metrics = {
        "debug/actor_pretanh_abs_mean": z.abs().mean(),
        "debug/actor_pretanh_abs_max": z.abs().max(),
        "alerts/action_saturation": (saturated.max() > 0.5).float(),
    }
    for i, name in enumerate(ACTION_NAMES):
        metrics[f"debug/action_saturated_{name}"] = saturated[i]
        metrics[f"debug/action_mean_{name}"] = action[:, i].mean()
        metrics[f"debug/action_std_{name}"] = action[:, i].std() if action.shape[0] > 1 else action.new_zeros(())
    return metrics


def read_back(metrics: Metrics) -> dict[str, float]:
    """`metrics` on the host, in one transfer (the one sync of a logged update)."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    values = torch.stack([metrics[k].detach().double() for k in keys]).tolist() if keys else []
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)} | dict(zip(keys, values))


class TD3:
    """Networks, targets, optimizers and the update."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        t = cfg.td3
        self.cfg = t
        self.learner_cfg = cfg.learner
        self.device = device
        self.twin = t.algo == "td3"
        self.actor = policy_for(cfg).to(device)
        self.critic = Critic(cfg.cnn.norm, num_q=2 if self.twin else 1, trunk_dim=cfg.cnn.trunk_dim,
                             vector_dim=vector_dim(cfg.env)).to(device)
        if cfg.learner.channels_last and device.type == "cuda":
            self.actor.cnn.to(memory_format=torch.channels_last)
            self.critic.cnn.to(memory_format=torch.channels_last)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = _optimizer(self.actor, t, device)
        self.critic_opt = _optimizer(self.critic, t, device)
        self.critic_parts = {"cnn": self.critic.cnn, "mlp": self.critic.heads}
        """The parts that train, each clipped on its own."""
        self.actor_parts = {"mlp": self.actor.head} if t.actor_encoder == "critic" else {"cnn": self.actor.cnn, "mlp": self.actor.head}
        for opt, parts in ((self.actor_opt, self.actor_parts), (self.critic_opt, self.critic_parts)):
            _init_state(opt, parts, device)
        lc = cfg.learner
        self.cnn_lr = AdaptiveCnnLr(
            [self.actor_opt, self.critic_opt], lc.feature_l2_threshold, lc.lr_cooldown_updates, lc.min_cnn_lr
        )
        self.guard = NonFiniteGuard(self.state_tensors, lc.nonfinite_restore_after, device)
        self.amp = device.type == "cuda" and lc.amp
        self.update_count = torch.zeros((), dtype=torch.int64, device=device)
        """`updates` on the device (the adaptive CNN lr's cooldown counts in it)."""
        self._updates = 0
        self.last_actions: Tensor | None = None
        """The policy's actions on the last actor-update batch, for the action histograms."""
        self.last_q: Tensor | None = None
        """Critic 1's Q on the last critic-update batch, for the Q histogram."""
        self.last_td_error: Tensor | None = None
        """(B,) |TD error| on the last critic-update batch, on the device: a prioritized sampler's
        new priorities, read back by the learner loop (`Learner`), never here."""
        self.huber_delta = cfg.replay.lap_min_priority if cfg.replay.sampler == "lap" else 0.0
        """LAP pairs its sampling with a Huber critic loss of this threshold; 0: the MSE."""
        self.compiled = compile_update(self, lc.compile)
        """`learner.compile`'s wrappers (none: empty); `learner.compiled.failures` says which fell back."""

    @property
    def updates(self) -> int:
        """Updates run, a skipped (non-finite) one included."""
        return self._updates

    @updates.setter
    def updates(self, n: int) -> None:
        self._updates = n
        self.update_count.fill_(n)

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _fp32(self) -> AbstractContextManager:
        """The heads, Q values, targets and losses stay fp32 under autocast: bf16 has a step of 2
        between 256 and 512, the size of a step reward, where Q values of this task live."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _alerts(self, metrics: Metrics) -> dict[str, Tensor]:
        worst = torch.stack([v for k, v in metrics.items() if k.startswith("gradients/")]).max()
        return {
            "alerts/gradient_explosion_warning": (worst > self.learner_cfg.grad_warning_norm).float(),
            "alerts/gradient_explosion_critical": (worst > self.learner_cfg.grad_critical_norm).float(),
        }

    def augment(self, batch: Batch) -> Batch:
        """DrQ-v2's random shift of both frame stacks (`td3.augment_shift`), or the batch as it is."""
        pad = self.cfg.augment_shift
        if not pad:
            return batch
        return dataclasses.replace(batch, image=random_shift(batch.image, pad), next_image=random_shift(batch.next_image, pad))

    def target_q(self, batch: Batch) -> Tensor:
        """r + gamma^k * (1 - done) * min_i Q'_i(s', pi'(s') + clipped noise), all from target nets.

        r sums k rewards (n-step returns) and gamma^k comes with the batch, so one-step and n-step
        batches share this line."""
        t = self.cfg
        with torch.no_grad():
            with self._autocast():
                critic_features = self.critic_target.cnn(batch.next_image)
                # With the critic's encoder the actor CNN is a copy of the critic's, so its target
                # would be a lagging copy of the target critic CNN: read that one instead.
                shared = t.actor_encoder == "critic"
                actor_features = critic_features if shared else self.actor_target.cnn(batch.next_image)
            with self._fp32():
                next_action = self.actor_target.head(actor_features.float(), batch.next_vector)
                if self.twin and t.policy_noise > 0:
                    noise = (torch.randn_like(next_action) * t.policy_noise).clamp(-t.noise_clip, t.noise_clip)
                    next_action = (next_action + noise).clamp(-1.0, 1.0)
                next_qs = self.critic_target.heads(critic_features.float(), batch.next_vector, next_action)
                next_q = torch.stack(next_qs).min(dim=0).values
                return batch.reward + batch.discount * (1.0 - batch.done) * next_q

    @staticmethod
    def _step(loss: Tensor, opt: torch.optim.Optimizer, prefix: str, parts: dict[str, nn.Module], clip: float,
              allowed: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Backward, clip, step; (ok, pre-clip norms). The step is masked on the device (fused
        Adam's found_inf: no change at all, its step count included) when the loss or a gradient
        is not finite or `allowed` is false."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = _clip(prefix, parts, clip)
        ok = allowed & torch.isfinite(torch.stack([loss.detach(), *grads.values()])).all()
        opt.found_inf = (~ok).float()
        opt.step()
        return ok, grads

    def encode(self, batch: Batch) -> Tensor:
        """The critic CNN's features of `batch.image` (with gradients)."""
        with self._autocast():
            return self.critic.cnn(batch.image)

    def td_loss(self, q: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
        """One critic's loss: the MSE; weighted by a prioritized sampler's importance `weight`;
        LAP's Huber with threshold `replay.lap_min_priority` (replay.sampler=lap)."""
        if self.huber_delta:
            return F.huber_loss(q, y, delta=self.huber_delta)
        if weight is None:
            return F.mse_loss(q, y)
        return (weight * (q - y).square()).mean()

    def critic_loss(self, batch: Batch, features: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(loss, critic 1's Q, |TD error|, metrics) on the critic CNN's `features` of `batch.image`.
        The per-sample |TD error| is the larger of the critics' (LAP's choice): what a prioritized
        sampler's priorities come from."""
        y = self.target_q(batch)
        with self._fp32():
            qs = self.critic.heads(features.float(), batch.vector, batch.action)
            loss = sum(self.td_loss(q, y, batch.weight) for q in qs)
            td_error = torch.stack([(q.detach() - y).abs() for q in qs]).max(dim=0).values
        metrics = {"debug/q_target_mean": y.mean(), **feature_stats("critic_cnn_", features)}
        for i, q in enumerate(qs, start=1):
            metrics[f"debug/q{i}_mean"] = q.detach().mean()
            metrics[f"debug/td_error_q{i}"] = (q.detach() - y).abs().mean()
        return loss, qs[0].detach(), td_error, metrics

    def update_critic(self, batch: Batch, features: Tensor | None = None, allowed: Tensor | None = None) -> dict[str, Tensor]:
        """`features`: `encode(batch)`, computed here when not given; `allowed` (0-d bool): may it
        step (the guard's say when not given)."""
        if features is None:
            features = self.encode(batch)
        loss, self.last_q, self.last_td_error, metrics = self.critic_loss(batch, features)
        allowed = self.guard.allowed if allowed is None else allowed
        ok, grads = self._step(loss, self.critic_opt, "critic", self.critic_parts, self.cfg.critic_grad_clip, allowed)
        return {"train/critic_loss": loss.detach(), **metrics, **grads, "alerts/nonfinite_loss": (~ok).float()}

    def actor_loss(self, batch: Batch, critic_features: Tensor, probe: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(loss, action, metrics). `probe`: zeros added to the action the critic sees; its
        gradient is dL/da (a leaf the compiled graph hands gradients to, where retain_grad would
        break the graph)."""
        t = self.cfg
        if t.actor_encoder == "critic":
            features = critic_features
        else:
            with self._autocast():
                features = self.actor.cnn(batch.image)
        with self._fp32():
            z = self.actor.head.pre_tanh(features.float(), batch.vector)
            action = torch.tanh(z)
            q1 = self.critic.heads(critic_features.float(), batch.vector, action + probe)[0]
            penalty = F.relu(z.abs() - t.pretanh_threshold).square().mean()
            loss = -q1.mean() + t.pretanh_penalty * penalty
            metrics = {"train/pretanh_penalty": penalty.detach()}
            if t.bc_weight > 0:
                bc, metrics["train/bc_share"] = self.behaviour_cloning(batch, critic_features, action, q1.detach())
                loss = loss + t.bc_weight * q1.detach().abs().mean() * bc
                metrics["train/bc_loss"] = bc.detach()
        metrics |= {**feature_stats("cnn_", features), **action_stats(z.detach(), action.detach())}
        return loss, action.detach(), metrics

    def behaviour_cloning(self, batch: Batch, critic_features: Tensor, action: Tensor,
                          q_policy: Tensor) -> tuple[Tensor, Tensor]:
        """(mean over the batch of the squared distance from `action` to the driver's action, on
        the transitions where it is known (`Batch.driver`), with `td3.bc_q_filter` only where critic
        1 values that action above `q_policy`; the share of the batch cloned)."""
        target = batch.action if batch.driver_action is None else batch.driver_action
        with torch.no_grad():
            cloned = batch.driver if batch.driver is not None else torch.zeros_like(q_policy)
            if self.cfg.bc_q_filter:
                q_driver = self.critic.heads(critic_features.float(), batch.vector, target)[0]
                cloned = cloned * (q_driver > q_policy).float()
        distance = (action - target).square().sum(dim=1)
        return (cloned * distance).mean(), cloned.mean()

    def update_actor(self, batch: Batch, critic_features: Tensor | None = None, allowed: Tensor | None = None) -> dict[str, Tensor]:
        """`critic_features`: the critic CNN's (detached) features of `batch.image`, as the critic
        update saw them before its step (DrQ-v2 reuses them too); computed here when not given."""
        t = self.cfg
        if critic_features is None:
            with torch.no_grad():
                critic_features = self.encode(batch)
        if t.actor_encoder == "critic":
            # The actor reads the critic's features; its CNN only mirrors the critic's, so the
            # published policy stays self-contained.
            with torch.no_grad():
                torch._foreach_copy_(list(self.actor.cnn.parameters()), list(self.critic.cnn.parameters()))
        probe = torch.zeros_like(batch.action, requires_grad=True)
        allowed = self.guard.allowed if allowed is None else allowed
        # No gradients for the critic's head parameters: the actor loss only needs dQ/da.
        self.critic.heads.requires_grad_(False)
        try:
            loss, self.last_actions, metrics = self.actor_loss(batch, critic_features, probe)
            ok, grads = self._step(loss, self.actor_opt, "actor", self.actor_parts, t.actor_grad_clip, allowed)
        finally:
            self.critic.heads.requires_grad_(True)
        # dL/da = -dQ1/da / B
        dq_da = (probe.grad * probe.shape[0]).norm(dim=1).mean()
        return {"train/actor_loss": loss.detach(), **metrics, **grads, "debug/dq_da_norm": dq_da,
                "alerts/nonfinite_loss": (~ok).float()}

    @torch.no_grad()
    def soft_update_targets(self, ok: Tensor | None = None) -> None:
        """Polyak averaging; weight 0 unless `ok` (0-d bool), so a skipped update moves nothing."""
        # Under no_grad: otherwise autograd records the lerp on the target parameters (the online
        # ones require grad) and chains every update's node onto them, ~30 KB more per call forever.
        # target += tau * (online - target), lerp's formula for tau < 0.5; not _foreach_lerp_,
        # which would read a tensor weight back to the host.
        tau = self.cfg.tau if ok is None else ok.float() * self.cfg.tau
        for online, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            targets = list(target.parameters())
            step = torch._foreach_sub(list(online.parameters()), targets)
            torch._foreach_mul_(step, tau)
            torch._foreach_add_(targets, step)

    def update(self, batch: Batch) -> Metrics:
        """One critic update; an actor and target update every `policy_delay` (TD3) or every time
        (DDPG). Nothing is read back to the host (`read_back` does that for a caller that logs).

        A non-finite loss or gradient changes nothing (alerts/nonfinite_loss = 1); after
        `learner.nonfinite_restore_after` such updates in a row the networks and optimizers go
        back to the last snapshot taken after a good update (`NonFiniteGuard`). The adaptive CNN
        lr keeps its halvings: the snapshot may predate one, and its count (and the instability
        that caused it) still stand.
        """
        batch = self.augment(batch)
        features = self.encode(batch)
        metrics: Metrics = self.update_critic(batch, features, self.guard.allowed)
        ok = metrics["alerts/nonfinite_loss"] == 0
        self.updates += 1
        delay = self.cfg.policy_delay if self.twin else 1
        if self.updates % delay == 0:
            if self.updates > self.cfg.critic_warmup_updates:
                metrics |= self.update_actor(batch, features.detach(), ok)  # its alert covers both
                ok = metrics["alerts/nonfinite_loss"] == 0
            self.soft_update_targets(ok)
        self.guard.record(ok)
        metrics["alerts/weights_restored"] = self.guard.maintain(self.updates)
        # The critic CNN is trained every update, the actor CNN every `delay`: watch both.
        worst_l2 = metrics["debug/critic_cnn_features_l2_norm"]
        if "debug/cnn_features_l2_norm" in metrics:
            worst_l2 = torch.maximum(worst_l2, metrics["debug/cnn_features_l2_norm"])
        metrics |= self._alerts(metrics)
        metrics |= self.cnn_lr.observe(worst_l2, self.update_count, ok)
        metrics["agent/mlp_lr"] = next(float(g["lr"]) for g in self.actor_opt.param_groups if g["name"] == "mlp")
        return metrics

    # -- checkpoint state ---------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic, "actor_target": self.actor_target, "critic_target": self.critic_target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt}

    def state_tensors(self) -> list[Tensor]:
        """What a restore puts back: the networks' parameters and buffers, the optimizers' state."""
        nets = [t for m in self.modules().values() for t in (*m.parameters(), *m.buffers())]
        slots = [v for opt in self.optimizers().values() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
        return nets + slots


def _init_state(opt: torch.optim.Optimizer, parts: dict[str, nn.Module], device: torch.device) -> None:
    """Creates the optimizer state of the parts that train, with a masked step on zero gradients
    (it changes nothing, the step count included): the guard's snapshot then covers it from the
    first update on, and it never changes size."""
    params = [p for m in parts.values() for p in m.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    opt.zero_grad(set_to_none=True)
