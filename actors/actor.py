"""Acting in one env: policy inference plus exploration, feeding an adder (Acme's Actor)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from colorednoise import powerlaw_psd_gaussian

from actors.baseline import baseline_for
from actors.envs import step_seconds
from common.config import Config
from common.driving import ACTION_DIM, Surroundings
from common.networks import Policy

log = logging.getLogger(__name__)


def acting_device(cfg: Config) -> torch.device:
    """`actors.device`, checked: a clear error where this process sees no GPU."""
    if cfg.actors.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("actors.device=cuda but this actor process sees no CUDA device "
                           f"(actors.num_gpus={cfg.actors.num_gpus}; CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use actors.device=cpu")
    return torch.device(cfg.actors.device)


def inference_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """`actors.inference_dtype`, with a warning where a CPU would only emulate bfloat16."""
    dtype = getattr(torch, cfg.actors.inference_dtype)
    if dtype == torch.bfloat16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("actors.inference_dtype=bfloat16 on a CPU without native bfloat16 (AVX512-BF16/AMX): "
                    "its forward is emulated and slower than float32; use actors.inference_dtype=float32")
    return dtype


def finite_step(observation: dict[str, np.ndarray], reward: float) -> bool:
    """False for a step whose vector observation or reward holds NaN or inf (frames are uint8)."""
    return bool(np.isfinite(reward) and np.isfinite(observation["vector"]).all())


class Actor:
    """For `learning_starts` steps uniform random actions, or the classical baseline's plus noise
    (`actors.warmup_actions`); then the policy plus Gaussian noise whose std decays linearly from
    `expl_noise_start` to `expl_noise_end`, times `noise_scale` (distributed actors spread their
    scales, Ape-X style), except in the `actors.guide_fraction` of episodes the warm-up driver
    still drives. With `actors.teacher_labels`, the privileged driver also says what it would do
    at every step (`last_teacher_action`)."""

    def __init__(
        self, policy: Policy, cfg: Config, rng: np.random.Generator, device: torch.device, noise_scale: float = 1.0,
        surroundings: Callable[[], Surroundings] | None = None,
    ) -> None:
        """`surroundings`: the env's truth (its backend's), for `actors.warmup_actions=privileged`
        and `actors.teacher_labels`."""
        self.policy = policy
        self.cfg = cfg.actors
        self.learning_starts = cfg.td3.learning_starts
        self.rng = rng
        self.device = device
        self.noise_scale = noise_scale
        # One Actor per env, so the baseline's PID state is this env's alone.
        # An Actor that only evaluates (no surroundings given) never acts before learning starts.
        warmup = cfg.actors.warmup_actions
        privileged = None if surroundings is None or not (warmup == "privileged" or cfg.actors.teacher_labels) \
            else baseline_for(cfg, step_seconds(cfg), surroundings)
        self.warmup = privileged if warmup == "privileged" else \
            baseline_for(cfg, step_seconds(cfg)) if warmup == "baseline" else None
        self.teacher = privileged if cfg.actors.teacher_labels else None
        """The privileged driver labelling each step (one object with a privileged warm-up driver,
        so its state advances once a step)."""
        self.last_teacher_action: np.ndarray | None = None
        """The teacher's action at the last `select_action`, within the action limit (None: no teacher)."""
        self.guided = False
        """Whether the warm-up driver drives this training episode (`actors.guide_fraction`)."""
        self.last_policy_action: np.ndarray | None = None
        """The policy's action before noise at the last `select_action` (None while acting randomly)."""
        self.horizon = cfg.env.max_episode_steps
        self._colored: np.ndarray | None = None
        self._draw_colored_noise()

    def noise_std(self, env_step: int) -> float:
        c = self.cfg
        frac = min(max(env_step - self.learning_starts, 0) / c.expl_noise_decay_steps, 1.0)
        return self.noise_scale * (c.expl_noise_start + frac * (c.expl_noise_end - c.expl_noise_start))

    def _draw_colored_noise(self) -> None:
        """A unit-variance (ACTION_DIM, horizon) sequence for this episode's coloured noise."""
        betas = self.cfg.expl_noise_exponent
        if max(betas) == 0:
            return
        if len(set(betas)) == 1:  # one draw for both rows: the stream of the measured pink arm
            self._colored = powerlaw_psd_gaussian(betas[0], (ACTION_DIM, self.horizon), random_state=self.rng)
        else:
            self._colored = np.stack([powerlaw_psd_gaussian(b, self.horizon, random_state=self.rng) for b in betas])
        self._t = 0

    def _noise(self, env_step: int) -> np.ndarray:
        """The exploration noise of this step: white from the generator, or the next column of
        the episode's coloured sequence (it wraps past the horizon)."""
        std = self.noise_std(env_step)
        if self._colored is None:
            return self.rng.normal(0.0, std, ACTION_DIM)
        column = self._colored[:, self._t % self.horizon]
        self._t += 1
        return std * column

    def acts_on_policy(self, env_step: int) -> bool:
        """Whether `select_action` at `env_step` needs the policy (not during the random start)."""
        return env_step >= self.learning_starts

    @torch.no_grad()
    def policy_actions(self, observations: list[dict[str, np.ndarray]]) -> np.ndarray:
        """(K, 2) deterministic actions of the current policy for K observations, one forward pass."""
        image = torch.from_numpy(np.stack([o["image"] for o in observations])).to(self.device)
        vector = torch.from_numpy(np.stack([o["vector"] for o in observations])).to(self.device)
        return self.policy(image, vector).float().cpu().numpy()

    def policy_action(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """The deterministic action of the current policy."""
        return self.policy_actions([observation])[0]

    def eval_action(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        """The action an evaluation takes: the policy's, without noise, within the action limit."""
        return self.limit(self.policy_action(observation))

    def select_action(self, observation: dict[str, np.ndarray], env_step: int,
                      policy_action: np.ndarray | None = None) -> np.ndarray:
        """`policy_action`: the policy's action for `observation` when the caller already has it
        (one batched forward over several envs); computed here when not given."""
        teacher = None if self.teacher is None else self.teacher(observation)
        self.last_teacher_action = None if teacher is None else self.limit(np.clip(teacher, -1.0, 1.0))
        if self.guided or not self.acts_on_policy(env_step):
            self.last_policy_action = None
            if self.warmup is None:
                if self.cfg.warmup_actions != "uniform":
                    raise ValueError(f"actors.warmup_actions={self.cfg.warmup_actions} needs the env's surroundings "
                                     "(its backend's) when the Actor is made")
                action = self.rng.uniform(-1.0, 1.0, ACTION_DIM)
            else:
                driven = teacher if self.warmup is self.teacher else self.warmup(observation)
                action = driven + self._noise(env_step)
        else:
            self.last_policy_action = self.policy_action(observation) if policy_action is None else policy_action
            action = self.last_policy_action + self._noise(env_step)
        return self.limit(np.clip(action, -1.0, 1.0).astype(np.float32))

    @property
    def driver_acted(self) -> bool:
        """Whether the last `select_action` was the warm-up driver's (warm-up or guided episode),
        not the policy's nor uniform noise."""
        return self.warmup is not None and self.last_policy_action is None

    def limit(self, action: np.ndarray) -> np.ndarray:
        if not self.cfg.action_scaling:
            return action
        lim = self.cfg.action_scaling_limit
        return np.clip(action, -lim, lim)

    def on_episode_start(self) -> None:
        self._draw_colored_noise()
        if self.teacher is not None and self.teacher is not self.warmup:
            self.teacher.reset()
        if self.warmup is not None:
            self.warmup.reset()
            if self.cfg.guide_fraction > 0:
                self.guided = bool(self.rng.random() < self.cfg.guide_fraction)
        if self.cfg.action_scaling:
            log.warning(
                "actors.action_scaling is on: actions are limited to +/-%.2f. This is the seeds' temporary "
                "safety measure; turn it off once CNN features are stable.", self.cfg.action_scaling_limit
            )
