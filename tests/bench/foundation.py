"""Embedded-env step rate (one core), learner updates/s and ring bytes per transition.
Timings live in benches, never in tests."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from actors.envs import make_env
from common.batch import Batch
from common.config import load_config
from learner.td3 import TD3
from actors.adder import ChunkAdder
from replay_server.ring import FrameRing
from tests.bench.report import write_report
from tests.conftest import random_batch_arrays


def env_rate(scenario: int, steps: int = 2000) -> float:
    env = make_env(load_config(overrides=[f"env.scenario={scenario}"]))
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-0.3, 0.3, 2).astype(np.float32) + [0, 0.3])
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def update_rate(batch_size: int, device: torch.device, n: int = 5) -> float:
    cfg = load_config(overrides=[f"td3.batch_size={batch_size}", "td3.critic_warmup_updates=0"])  # time steady-state updates
    agent = TD3(cfg, device)
    batch = Batch.from_numpy(random_batch_arrays(batch_size), device)
    for _ in range(2):
        agent.update(batch)
    start = time.perf_counter()
    for _ in range(n):
        agent.update(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def ring_bytes_per_transition(steps: int = 1000) -> float:
    env = make_env(load_config())
    ring = FrameRing(capacity=steps)
    adder = ChunkAdder(0, 32, ring.add_chunk)
    obs, _ = env.reset(seed=0)
    adder.reset(obs)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        action = rng.uniform(-0.3, 0.3, 2).astype(np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        adder.add(action, reward, obs, terminated, truncated)
        if terminated or truncated:
            obs, _ = env.reset()
            adder.reset(obs)
    env.close()
    used_frames = min(ring.frames_added, ring.frame_capacity)
    per_transition_arrays = sum(a.nbytes / ring.capacity for a in (ring.frame_ids, ring.vector, ring.next_vector, ring.action, ring.reward, ring.done))
    return used_frames * ring.frames[0].nbytes / len(ring) + per_transition_arrays


def run() -> dict[str, float]:
    results: dict[str, float] = {}
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # the env target is per core
    for scenario in (0, 1, 2):
        results[f"env_steps_per_s_scenario{scenario}_1core"] = env_rate(scenario)
    os.sched_setaffinity(0, cores)
    results["replay_ring_bytes_per_transition"] = ring_bytes_per_transition()
    results["old_system_bytes_per_transition"] = 2 * 4 * 84 * 84 * 4  # float32 s and s' stacks
    results["learner_updates_per_s_b256_cpu"] = update_rate(256, torch.device("cpu"))
    if torch.cuda.is_available():
        results["learner_updates_per_s_b256_cuda"] = update_rate(256, torch.device("cuda"), n=50)
    return results


if __name__ == "__main__":
    write_report("foundation", run())
