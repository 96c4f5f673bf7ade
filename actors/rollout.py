"""The rollout worker: one env, the policy on CPU with exploration noise, chunks to the replay
service, newer weights pulled by version. Plain Python, run as a Ray actor by the learner."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from actors.actor import Actor
from actors.adder import ChunkAdder
from actors.envs import make_env
from actors.runner import EpisodeRunner
from common.config import from_dict
from common.networks import policy_for
from common.weights import VariableClient
from replay_server.client import ReplayClient, connect


def noise_scales(n: int, low: float, high: float) -> list[float]:
    """Ape-X style: actor i explores with low * (high/low)^(i/(n-1))."""
    if n == 1:
        return [float(np.sqrt(low * high))]
    return [float(low * (high / low) ** (i / (n - 1))) for i in range(n)]


class RolloutWorker:
    """Runs env steps in calls of `run()`, between which the learner collects its reports."""

    def __init__(self, cfg_dict: dict[str, Any], index: int, incarnation: int, noise_scale: float,
                 redis_url: str, weight_store: Any) -> None:
        torch.set_num_threads(1)
        cfg = from_dict(cfg_dict)
        self.cfg = cfg
        self.index = index
        seed = cfg.seed + 1000 * (index + 1) + 100_000 * incarnation
        self.env = make_env(cfg, slot=index)
        self.policy = policy_for(cfg.cnn).eval()
        self.actor = Actor(self.policy, cfg, np.random.default_rng(seed), torch.device("cpu"), noise_scale)
        r = cfg.replay
        self.client = ReplayClient(connect(redis_url), r.stream_key, max_chunks=-(-r.capacity // r.chunk_steps),
                                   buffer_chunks=r.client_buffer_chunks)
        self.adder = ChunkAdder(actor_id=index, chunk_steps=r.chunk_steps, sink=self.client.insert)
        self.weights = VariableClient(weight_store, self.policy)
        self.weights.update(wait=True)  # start from the learner's current policy
        self.runner = EpisodeRunner(self.env, self.actor, self.adder, seed)
        self.steps = 0

    def run(self, steps: int, global_step: int) -> dict[str, Any]:
        """`steps` env steps; `global_step` is the run's env-step count, for the exploration schedule."""
        finished: list[dict[str, float]] = []
        for i in range(steps):
            if self.steps % self.cfg.actors.weight_sync_steps == 0:
                self.weights.update()
            episode = self.runner.step(global_step + i, policy_version=max(self.weights.version, 0))
            self.steps += 1
            if episode is not None:
                finished.append(episode)
        c = self.client.counters
        return {
            "steps": steps,
            "episodes": finished,
            "policy_version": self.weights.version,
            "weight_fetches": self.weights.fetches,
            "transitions_dropped": c.transitions_dropped,
            "send_failures": c.send_failures,
            "nonfinite_dropped": self.runner.nonfinite,
            "simulator_failures": self.runner.simulator_failures,
            "env": self.env.backend.metrics(),
        }

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
