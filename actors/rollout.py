"""The rollout worker: K envs, the policy on CPU (one batched forward per step) with exploration
noise, chunks to the replay service, newer weights pulled by version. Plain Python, run as a Ray
actor by the learner."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from actors.actor import Actor, acting_device, inference_dtype
from actors.adder import ChunkAdder
from actors.envs import make_env, noise_scale, rollout_slot
from actors.runner import EpisodeRunner, VectorRunner
from common.config import from_dict
from common.env import DrivingEnv
from common.networks import policy_for
from common.weights import VariableClient
from replay_server.client import ReplayClient, connect


class RolloutWorker:
    """Runs env steps in calls of `run()`, between which the learner collects its reports.

    It steps `actors.envs_per_actor` envs together (one batched policy forward per step); env j
    has its own slot, and from it its seed, noise scale, chunk stream and episodes."""

    def __init__(self, cfg_dict: dict[str, Any], index: int, incarnation: int, redis_url: str, weight_store: Any) -> None:
        torch.set_num_threads(1)
        cfg = from_dict(cfg_dict)
        self.cfg = cfg
        self.index = index
        slots = [rollout_slot(cfg, index, j) for j in range(cfg.actors.envs_per_actor)]
        self.envs: list[DrivingEnv] = []
        try:
            for slot in slots:
                self.envs.append(make_env(cfg, slot=slot, training=True))
        except BaseException:
            self.close()  # servers already launched for this actor must not outlive it
            raise
        device = acting_device(cfg)
        self.policy = policy_for(cfg).eval().to(device, inference_dtype(cfg, device))
        r = cfg.replay
        self.client = ReplayClient(connect(redis_url), r.stream_key, max_chunks=-(-r.capacity // r.chunk_steps),
                                   buffer_chunks=r.client_buffer_chunks)
        self.weights = VariableClient(weight_store, self.policy)
        self.weights.update(wait=True)  # start from the learner's current policy
        runners = []
        for slot, env in zip(slots, self.envs):
            # With one env per actor, the seeds of the runs before envs_per_actor existed.
            seed = cfg.seed + 1000 * (slot + 1) + 100_000 * incarnation
            actor = Actor(self.policy, cfg, np.random.default_rng(seed), device, noise_scale(cfg, slot),
                          env.backend.surroundings)
            adder = ChunkAdder(actor_id=slot, chunk_steps=r.chunk_steps, sink=self.client.insert)
            runners.append(EpisodeRunner(env, actor, adder, seed))
        self.runner = VectorRunner(runners)
        self.steps = 0
        self.loop_seconds = 0.0

    def run(self, steps: int, global_step: int) -> dict[str, Any]:
        """About `steps` env steps over all envs (whole rounds of one step per env); `global_step`
        is the run's env-step count, for the exploration schedule."""
        k = len(self.envs)
        rounds = max(1, -(-steps // k))
        sync = self.cfg.actors.weight_sync_steps
        finished: list[dict[str, float]] = []
        start = time.perf_counter()
        for i in range(rounds):
            if (self.steps + k - 1) // sync != (self.steps - 1) // sync:  # a multiple of sync among this round's steps
                self.weights.update()
            finished += self.runner.step(global_step + i * k, policy_version=max(self.weights.version, 0))
            self.steps += k
        self.loop_seconds += time.perf_counter() - start
        c = self.client.counters
        return {
            "steps": rounds * k,
            "episodes": finished,
            "policy_version": self.weights.version,
            "weight_fetches": self.weights.fetches,
            "transitions_dropped": c.transitions_dropped,
            "send_failures": c.send_failures,
            "nonfinite_dropped": self.runner.nonfinite,
            "simulator_failures": self.runner.simulator_failures,
            "inference_seconds": self.runner.inference_seconds,
            "loop_seconds": self.loop_seconds,
            "envs": [env.backend.metrics() for env in self.envs],
        }

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
