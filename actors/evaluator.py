"""Deterministic evaluation episodes and the seeds' eval metrics."""

from __future__ import annotations

from typing import Callable

import numpy as np

from common.env import DrivingEnv

PolicyFn = Callable[[dict[str, np.ndarray]], np.ndarray]


def run_episode(env: DrivingEnv, policy: PolicyFn, seed: int) -> dict[str, float | str | None]:
    obs, _ = env.reset(seed=seed)
    total, steps, invasions, done = 0.0, 0, 0, False
    info: dict = {}
    while not done:
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        total += reward
        steps += 1
        invasions += int(info["lane_invasion"])
        done = terminated or truncated
    return {"reward": total, "length": steps, "lane_invasions": invasions, "termination": info["termination"]}


def evaluate(env: DrivingEnv, policy: PolicyFn, episodes: int, seed: int) -> dict[str, float]:
    """`episodes` episodes with seeds seed, seed+1, ...; success = route completed."""
    results = [run_episode(env, policy, seed + i) for i in range(episodes)]
    reasons = [r["termination"] for r in results]
    return {
        "eval/mean_reward": float(np.mean([r["reward"] for r in results])),
        "eval/success_rate": reasons.count("route_completed") / episodes,
        "eval/collision_rate": reasons.count("collision") / episodes,
        "eval/avg_lane_invasions": float(np.mean([r["lane_invasions"] for r in results])),
        "eval/avg_episode_length": float(np.mean([r["length"] for r in results])),
    }
