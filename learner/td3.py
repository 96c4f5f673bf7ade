"""TD3 (and DDPG) with separate, normalized actor and critic CNNs, each with a target copy.

The target action comes from the *target actor CNN + target actor head*; the target Q values
from the *target critic CNN + target critic heads*. When the actor reads the critic's features
(`td3.actor_encoder=critic`, the default) the target actor head reads the target critic CNN's
too, and the actor update reuses the features the critic update computed (DrQ-v2's arrangement):
two CNN forward passes per update fewer. The old system computed the target action with the
online critic's CNN and had no target CNNs; `tests/test_td3.py` pins down which CNN feeds which
quantity.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from common.batch import Batch
from common.config import Config, TD3Config
from common.driving import ACTION_NAMES
from common.networks import Critic, Policy, frames_to_float, policy_for
from learner.monitor import AdaptiveCnnLr

log = logging.getLogger(__name__)
SNAPSHOT_EVERY = 100  # good updates between in-memory snapshots for non-finite recovery
SATURATED = 0.99  # |action| beyond which an action component counts as saturated (tanh(2.65))


def _optimizer(model: Policy | Critic, t: TD3Config, device: torch.device) -> torch.optim.Optimizer:
    """'cnn' groups (own lr, weight decay) and an 'mlp' group (no weight decay).

    `l2` (the seeds'): Adam's L2 weight_decay on every CNN parameter. `decoupled`: AdamW's decay on
    the CNN's conv and linear weights only; LayerNorm gains and all biases are not decayed."""
    head = model.head if isinstance(model, Policy) else model.heads
    mlp = {"params": list(head.parameters()), "lr": t.mlp_lr, "weight_decay": 0.0, "name": "mlp"}
    fused = device.type == "cuda"
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


def _clip(prefix: str, model: Policy | Critic, max_norm: float) -> dict[str, float]:
    """Clips the CNN and the MLP gradients separately; reports each norm before clipping (after
    it is min(norm, max_norm)). A part with no gradient at all (the actor's CNN when it reads the
    critic's features) reports nothing rather than a flat zero."""
    head = model.head if isinstance(model, Policy) else model.heads
    metrics = {}
    for part, module in (("cnn", model.cnn), ("mlp", head)):
        if all(p.grad is None for p in module.parameters()):
            continue
        metrics[f"gradients/{prefix}_{part}_norm"] = float(nn.utils.clip_grad_norm_(module.parameters(), max_norm))
    return metrics


def feature_stats(prefix: str, features: torch.Tensor) -> dict[str, float]:
    f = features.detach().float()
    return {
        f"debug/{prefix}features_l2_norm": float(f.norm(dim=1).mean()),
        f"debug/{prefix}feature_mean": float(f.mean()),
        f"debug/{prefix}feature_std": float(f.std()),
        f"debug/{prefix}feature_min": float(f.min()),
        f"debug/{prefix}feature_max": float(f.max()),
    }


def action_stats(z: torch.Tensor, action: torch.Tensor, loss_grad: torch.Tensor) -> dict[str, float]:
    """What shows an action lock before it costs a run: the pre-tanh magnitude, the saturated
    fraction, mean and std per action dimension, and |dQ/da| (from the actor loss's gradient
    w.r.t. the action, -dQ1/da / B)."""
    saturated = (action.abs() > SATURATED).float().mean(dim=0)
    metrics = {
        "debug/actor_pretanh_abs_mean": float(z.abs().mean()),
        "debug/actor_pretanh_abs_max": float(z.abs().max()),
        "alerts/action_saturation": float(saturated.max() > 0.5),
        "debug/dq_da_norm": float((loss_grad * action.shape[0]).norm(dim=1).mean()),
    }
    for i, name in enumerate(ACTION_NAMES):
        metrics[f"debug/action_saturated_{name}"] = float(saturated[i])
        metrics[f"debug/action_mean_{name}"] = float(action[:, i].mean())
        metrics[f"debug/action_std_{name}"] = float(action[:, i].std()) if action.shape[0] > 1 else 0.0
    return metrics


class TD3:
    """Networks, targets, optimizers and the update."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        t = cfg.td3
        self.cfg = t
        self.learner_cfg = cfg.learner
        self.device = device
        self.twin = t.algo == "td3"
        self.actor = policy_for(cfg.cnn).to(device)
        self.critic = Critic(cfg.cnn.norm, num_q=2 if self.twin else 1, trunk_dim=cfg.cnn.trunk_dim).to(device)
        if cfg.learner.channels_last and device.type == "cuda":
            self.actor.cnn.to(memory_format=torch.channels_last)
            self.critic.cnn.to(memory_format=torch.channels_last)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = _optimizer(self.actor, t, device)
        self.critic_opt = _optimizer(self.critic, t, device)
        lc = cfg.learner
        self.cnn_lr = AdaptiveCnnLr(
            [self.actor_opt, self.critic_opt], lc.feature_l2_threshold, lc.lr_cooldown_updates, lc.min_cnn_lr
        )
        self.amp = device.type == "cuda" and lc.amp
        self.updates = 0
        self.bad_streak = 0
        self._good: dict[str, dict] | None = None
        self.last_actions: torch.Tensor | None = None
        """The policy's actions on the last actor-update batch, for the action histograms."""
        self.last_q: torch.Tensor | None = None
        """Critic 1's Q on the last critic-update batch, for the Q histogram."""

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _fp32(self) -> AbstractContextManager:
        """The heads, Q values, targets and losses stay fp32 under autocast: bf16 has a step of 2
        between 256 and 512, the size of a step reward, where Q values of this task live."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _alerts(self, grads: dict[str, float]) -> dict[str, float]:
        worst = max(v for k, v in grads.items() if k.startswith("gradients/"))
        return {
            "alerts/gradient_explosion_warning": float(worst > self.learner_cfg.grad_warning_norm),
            "alerts/gradient_explosion_critical": float(worst > self.learner_cfg.grad_critical_norm),
        }

    def target_q(self, batch: Batch) -> torch.Tensor:
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
    def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, prefix: str, model: nn.Module, clip: float) -> dict[str, float] | None:
        """Backward, clip, step; None (and no change at all) when the loss or a gradient is not finite."""
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        grads = _clip(prefix, model, clip)
        if not all(math.isfinite(v) for v in grads.values()):
            opt.zero_grad(set_to_none=True)
            return None
        opt.step()
        return grads

    def encode(self, batch: Batch) -> torch.Tensor:
        """The critic CNN's features of `batch.image` (with gradients)."""
        with self._autocast():
            return self.critic.cnn(batch.image)

    def update_critic(self, batch: Batch, features: torch.Tensor | None = None) -> dict[str, float]:
        """`features`: `encode(batch)`, computed here when not given."""
        y = self.target_q(batch)
        if features is None:
            features = self.encode(batch)
        with self._fp32():
            qs = self.critic.heads(features.float(), batch.vector, batch.action)
            loss = sum(F.mse_loss(q, y) for q in qs)
        grads = self._step(loss, self.critic_opt, "critic", self.critic, self.cfg.critic_grad_clip)
        if grads is None:
            return {"alerts/nonfinite_loss": 1.0}
        metrics = {"train/critic_loss": float(loss.detach()), "debug/q_target_mean": float(y.mean()),
                   **grads, **feature_stats("critic_cnn_", features)}
        self.last_q = qs[0].detach()
        for i, q in enumerate(qs, start=1):
            metrics[f"debug/q{i}_mean"] = float(q.detach().mean())
            metrics[f"debug/td_error_q{i}"] = float((q.detach() - y).abs().mean())
        return metrics

    def update_actor(self, batch: Batch, critic_features: torch.Tensor | None = None) -> dict[str, float]:
        """`critic_features`: the critic CNN's (detached) features of `batch.image`, as the critic
        update saw them before its step (DrQ-v2 reuses them too); computed here when not given."""
        t = self.cfg
        if critic_features is None:
            with torch.no_grad():
                critic_features = self.encode(batch)
        with self._autocast():
            if t.actor_encoder == "critic":
                # The actor reads the critic's features; its CNN only mirrors the critic's, so the
                # published policy stays self-contained.
                with torch.no_grad():
                    torch._foreach_copy_(list(self.actor.cnn.parameters()), list(self.critic.cnn.parameters()))
                features = critic_features
            else:
                features = self.actor.cnn(batch.image)
        # No gradients for the critic's head parameters: the actor loss only needs dQ/da.
        self.critic.heads.requires_grad_(False)
        try:
            with self._fp32():
                z = self.actor.head.pre_tanh(features.float(), batch.vector)
                action = torch.tanh(z)
                action.retain_grad()
                q1 = self.critic.heads(critic_features.float(), batch.vector, action)[0]
                penalty = F.relu(z.abs() - t.pretanh_threshold).square().mean()
                loss = -q1.mean() + t.pretanh_penalty * penalty
            grads = self._step(loss, self.actor_opt, "actor", self.actor, t.actor_grad_clip)
        finally:
            self.critic.heads.requires_grad_(True)
        if grads is None:
            return {"alerts/nonfinite_loss": 1.0}
        self.last_actions = action.detach()
        return {
            "train/actor_loss": float(loss.detach()),
            "train/pretanh_penalty": float(penalty.detach()),
            **grads,
            **feature_stats("cnn_", features),
            **action_stats(z.detach(), action.detach(), action.grad),
        }

    @torch.no_grad()
    def soft_update_targets(self) -> None:
        # Under no_grad: otherwise autograd records the lerp on the target parameters (the online
        # ones require grad) and chains every update's node onto them, ~30 KB more per call forever.
        tau = self.cfg.tau
        for online, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)

    def update(self, batch: Batch) -> dict[str, float]:
        """One critic update; an actor and target update every `policy_delay` (TD3) or every time (DDPG).

        A non-finite loss or gradient changes nothing and raises alerts/nonfinite_loss; after
        `learner.nonfinite_restore_after` such updates in a row, the networks and optimizers go
        back to the last snapshot taken after a good update.
        """
        if self.cfg.augment_shift:
            pad = self.cfg.augment_shift
            batch = dataclasses.replace(batch, image=random_shift(batch.image, pad),
                                        next_image=random_shift(batch.next_image, pad))
        features = self.encode(batch)
        metrics = self.update_critic(batch, features)
        if "alerts/nonfinite_loss" in metrics:
            return self._nonfinite(metrics)
        self.updates += 1
        delay = self.cfg.policy_delay if self.twin else 1
        if self.updates % delay == 0:
            if self.updates > self.cfg.critic_warmup_updates:
                actor_metrics = self.update_actor(batch, features.detach())
                if "alerts/nonfinite_loss" in actor_metrics:
                    return self._nonfinite(metrics | actor_metrics)
                metrics |= actor_metrics
            self.soft_update_targets()
        self.bad_streak = 0
        if self.updates % SNAPSHOT_EVERY == 0 or self._good is None:
            self._good = self._snapshot()
        metrics["alerts/nonfinite_loss"] = 0.0
        # The critic CNN is trained every update, the actor CNN every `delay`: watch both.
        worst_l2 = max(metrics["debug/critic_cnn_features_l2_norm"], metrics.get("debug/cnn_features_l2_norm", 0.0))
        metrics |= self._alerts(metrics)
        metrics |= self.cnn_lr.observe(worst_l2, self.updates)
        metrics["agent/mlp_lr"] = next(float(g["lr"]) for g in self.actor_opt.param_groups if g["name"] == "mlp")
        return metrics

    def _snapshot(self) -> dict[str, dict]:
        parts = {**self.modules(), **self.optimizers()}
        return {k: copy.deepcopy(v.state_dict()) for k, v in parts.items()}

    def _nonfinite(self, metrics: dict[str, float]) -> dict[str, float]:
        self.bad_streak += 1
        metrics["alerts/nonfinite_loss"] = 1.0
        restore = self.bad_streak >= self.learner_cfg.nonfinite_restore_after and self._good is not None
        if restore:
            # The adaptive CNN lr keeps its halvings: the snapshot may predate one, and its count
            # (and the instability that caused it) still stand.
            cnn_lrs = [g["lr"] for g in self.cnn_lr.groups]
            for name, part in {**self.modules(), **self.optimizers()}.items():
                # A copy: Optimizer.load_state_dict keeps the given state tensors, and later steps
                # would otherwise drift the snapshot along with the live optimizer.
                part.load_state_dict(copy.deepcopy(self._good[name]))
            for group, lr in zip(self.cnn_lr.groups, cnn_lrs):
                group["lr"] = lr
            log.warning("%d non-finite updates in a row: restored the weights of the last good snapshot", self.bad_streak)
            self.bad_streak = 0
        else:
            log.warning("non-finite loss or gradient: update skipped (%d in a row)", self.bad_streak)
        metrics["alerts/weights_restored"] = float(restore)
        return metrics

    # -- checkpoint state ---------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic, "actor_target": self.actor_target, "critic_target": self.critic_target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt}
