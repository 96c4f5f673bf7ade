"""TD3 (and DDPG) with separate, normalized actor and critic CNNs, each with a target copy.

The target action comes from the *target actor CNN + target actor head*; the target Q values
from the *target critic CNN + target critic heads*. The old system computed the target action
with the online critic's CNN and had no target CNNs; `tests/test_td3.py` pins down which CNN
feeds which quantity.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from common.batch import Batch
from common.config import Config
from common.networks import Critic, Policy
from learner.monitor import AdaptiveCnnLr

log = logging.getLogger(__name__)
SNAPSHOT_EVERY = 100  # good updates between in-memory snapshots for non-finite recovery


def _optimizer(model: Policy | Critic, cnn_lr: float, mlp_lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam with a 'cnn' group (own lr, weight decay) and an 'mlp' group (no weight decay)."""
    head = model.head if isinstance(model, Policy) else model.heads
    groups = [
        {"params": list(model.cnn.parameters()), "lr": cnn_lr, "weight_decay": weight_decay, "name": "cnn"},
        {"params": list(head.parameters()), "lr": mlp_lr, "weight_decay": 0.0, "name": "mlp"},
    ]
    return torch.optim.Adam(groups, fused=device.type == "cuda")


def _clip(prefix: str, model: Policy | Critic, max_norm: float) -> dict[str, float]:
    """Clips the CNN and the MLP gradients separately; reports norms before and after."""
    head = model.head if isinstance(model, Policy) else model.heads
    metrics = {}
    for part, module in (("cnn", model.cnn), ("mlp", head)):
        before = float(nn.utils.clip_grad_norm_(module.parameters(), max_norm))
        metrics[f"gradients/{prefix}_{part}_norm_before_clip"] = before
        metrics[f"gradients/{prefix}_{part}_norm"] = min(before, max_norm)
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


class TD3:
    """Networks, targets, optimizers and the update."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        t = cfg.td3
        self.cfg = t
        self.learner_cfg = cfg.learner
        self.device = device
        self.twin = t.algo == "td3"
        self.actor = Policy(cfg.cnn.norm).to(device)
        self.critic = Critic(cfg.cnn.norm, num_q=2 if self.twin else 1).to(device)
        if cfg.learner.channels_last:
            self.actor.cnn.to(memory_format=torch.channels_last)
            self.critic.cnn.to(memory_format=torch.channels_last)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = _optimizer(self.actor, t.cnn_lr, t.mlp_lr, t.cnn_weight_decay, device)
        self.critic_opt = _optimizer(self.critic, t.cnn_lr, t.mlp_lr, t.cnn_weight_decay, device)
        lc = cfg.learner
        self.cnn_lr = AdaptiveCnnLr(
            [self.actor_opt, self.critic_opt], lc.feature_l2_threshold, lc.lr_cooldown_updates, lc.min_cnn_lr
        )
        self.amp = device.type == "cuda" and lc.amp
        self.updates = 0
        self.bad_streak = 0
        self._good: dict[str, dict] | None = None

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _alerts(self, grads: dict[str, float]) -> dict[str, float]:
        worst = max(v for k, v in grads.items() if k.endswith("_before_clip"))
        return {
            "alerts/gradient_explosion_warning": float(worst > self.learner_cfg.grad_warning_norm),
            "alerts/gradient_explosion_critical": float(worst > self.learner_cfg.grad_critical_norm),
        }

    def target_q(self, batch: Batch) -> torch.Tensor:
        """r + gamma * (1 - done) * min_i Q'_i(s', pi'(s') + clipped noise), all from target nets."""
        t = self.cfg
        with torch.no_grad(), self._autocast():
            next_action = self.actor_target(batch.next_image, batch.next_vector).float()
            if self.twin and t.policy_noise > 0:
                noise = (torch.randn_like(next_action) * t.policy_noise).clamp(-t.noise_clip, t.noise_clip)
                next_action = (next_action + noise).clamp(-1.0, 1.0)
            next_qs = self.critic_target(batch.next_image, batch.next_vector, next_action)
            next_q = torch.stack([q.float() for q in next_qs]).min(dim=0).values
            return batch.reward + t.gamma * (1.0 - batch.done) * next_q

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

    def update_critic(self, batch: Batch) -> dict[str, float]:
        y = self.target_q(batch)
        with self._autocast():
            features = self.critic.cnn(batch.image)
            qs = [q.float() for q in self.critic.heads(features, batch.vector, batch.action)]
        loss = sum(F.mse_loss(q, y) for q in qs)
        grads = self._step(loss, self.critic_opt, "critic", self.critic, self.cfg.critic_grad_clip)
        if grads is None:
            return {"alerts/nonfinite_loss": 1.0}
        metrics = {"train/critic_loss": float(loss.detach()), **grads, **feature_stats("critic_cnn_", features)}
        for i, q in enumerate(qs, start=1):
            metrics[f"debug/q{i}_mean"] = float(q.detach().mean())
            metrics[f"debug/td_error_q{i}"] = float((q.detach() - y).abs().mean())
        return metrics

    def update_actor(self, batch: Batch) -> dict[str, float]:
        with self._autocast():
            features = self.actor.cnn(batch.image)
            action = self.actor.head(features, batch.vector)
            with torch.no_grad():
                critic_features = self.critic.cnn(batch.image)
            q1 = self.critic.heads(critic_features, batch.vector, action)[0].float()
        loss = -q1.mean()
        grads = self._step(loss, self.actor_opt, "actor", self.actor, self.cfg.actor_grad_clip)
        if grads is None:
            return {"alerts/nonfinite_loss": 1.0}
        return {"train/actor_loss": float(loss.detach()), **grads, **feature_stats("cnn_", features)}

    def soft_update_targets(self) -> None:
        tau = self.cfg.tau
        for online, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)

    def update(self, batch: Batch) -> dict[str, float]:
        """One critic update; an actor and target update every `policy_delay` (TD3) or every time (DDPG).

        A non-finite loss or gradient changes nothing and raises alerts/nonfinite_loss; after
        `learner.nonfinite_restore_after` such updates in a row, the networks and optimizers go
        back to the last snapshot taken after a good update.
        """
        metrics = self.update_critic(batch)
        if "alerts/nonfinite_loss" in metrics:
            return self._nonfinite(metrics)
        self.updates += 1
        delay = self.cfg.policy_delay if self.twin else 1
        if self.updates % delay == 0:
            actor_metrics = self.update_actor(batch)
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
        metrics["agent/mlp_lr"] = float(self.actor_opt.param_groups[1]["lr"])
        return metrics

    def _snapshot(self) -> dict[str, dict]:
        parts = {**self.modules(), **self.optimizers()}
        return {k: copy.deepcopy(v.state_dict()) for k, v in parts.items()}

    def _nonfinite(self, metrics: dict[str, float]) -> dict[str, float]:
        self.bad_streak += 1
        metrics["alerts/nonfinite_loss"] = 1.0
        restore = self.bad_streak >= self.learner_cfg.nonfinite_restore_after and self._good is not None
        if restore:
            for name, part in {**self.modules(), **self.optimizers()}.items():
                part.load_state_dict(self._good[name])
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
