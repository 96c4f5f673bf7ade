"""Deterministic evaluation episodes and the seeds' eval metrics."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from common.env import DrivingEnv, SimulatorFailure

log = logging.getLogger(__name__)

PolicyFn = Callable[[dict[str, np.ndarray]], np.ndarray]
"""Observation -> action; a policy with a `reset()` method (the baseline's PID) is reset at each episode start."""
MAX_VIDEO_FRAMES = 300
EPISODE_ATTEMPTS = 3


def run_episode(env: DrivingEnv, policy: PolicyFn, seed: int, frames: list | None = None) -> dict[str, float | str | None]:
    """One deterministic episode; with `frames`, appends a picture of every other step to it."""
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset()
    total, steps, invasions, done = 0.0, 0, 0, False
    info: dict = {}
    while not done:
        if frames is not None and steps % 2 == 0 and len(frames) < MAX_VIDEO_FRAMES:
            frames.append(env.render())
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        total += reward
        steps += 1
        invasions += int(info["lane_invasion"])
        done = terminated or truncated
    return {"reward": total, "length": steps, "lane_invasions": invasions, "termination": info["termination"]}


def run_episode_retrying(env: DrivingEnv, policy: PolicyFn, seed: int, frames: list | None = None) -> dict[str, Any]:
    """`run_episode`, run again from its start when the simulator fails under it."""
    for attempt in range(1, EPISODE_ATTEMPTS + 1):
        try:
            return run_episode(env, policy, seed, frames)
        except SimulatorFailure as exc:
            if attempt == EPISODE_ATTEMPTS:
                raise
            log.warning("evaluation episode (seed %d) lost to a simulator failure, running it again: %s", seed, exc)
            if frames is not None:
                frames.clear()
    raise AssertionError("unreachable")


def evaluate(env: DrivingEnv, policy: PolicyFn, episodes: int, seed: int, frames: list | None = None) -> dict[str, float]:
    """`episodes` episodes with seeds seed, seed+1, ...; success = route completed. With
    `frames`, the first episode is recorded into it."""
    return summarize([run_episode_retrying(env, policy, seed + i, frames if i == 0 else None) for i in range(episodes)])


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """The eval/* metrics of a list of `run_episode` results."""
    episodes = len(results)
    reasons = [r["termination"] for r in results]
    return {
        "eval/mean_reward": float(np.mean([r["reward"] for r in results])),
        "eval/success_rate": reasons.count("route_completed") / episodes,
        "eval/collision_rate": reasons.count("collision") / episodes,
        "eval/avg_lane_invasions": float(np.mean([r["lane_invasions"] for r in results])),
        "eval/avg_episode_length": float(np.mean([r["length"] for r in results])),
    }


class EvalWorker:
    """The evaluator process (a Ray actor in distributed mode): its own env and CPU policy."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        import torch

        from actors.actor import Actor
        from actors.envs import make_env
        from common.config import from_dict
        from common.networks import policy_for

        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict)
        self.env = make_env(self.cfg, slot=self.cfg.actors.num_actors)
        self.actor = Actor(policy_for(self.cfg.cnn).eval(), self.cfg, np.random.default_rng(0), torch.device("cpu"))

    def evaluate(self, weights: bytes, seed: int, video: bool) -> tuple[dict[str, float], bytes | None, tuple[int, int]]:
        """Metrics of `eval.num_episodes` deterministic episodes under `weights`, and a GIF of the first."""
        from common.metrics import encode_gif
        from common.weights import load_policy_bytes

        load_policy_bytes(self.actor.policy, weights)
        frames: list | None = [] if video else None
        metrics = evaluate(self.env, self.actor.eval_action, self.cfg.eval.num_episodes, seed, frames)
        if not frames:
            return metrics, None, (0, 0)
        return metrics, encode_gif(frames), frames[0].shape[:2]
