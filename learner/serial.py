"""Serial mode: one process wires env -> actor -> chunk adder -> replay -> ring -> TD3
learner, the same objects the distributed mode spreads over processes. Chunks go straight into
the ring, or through the Redis replay service with `replay.via_redis`. For laptops, tests and
debugging.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.actor import Actor
from actors.adder import ChunkAdder
from actors.envs import make_env
from actors.evaluator import evaluate
from common.batch import Batch
from common.config import Config, to_dict, to_yaml
from common.driving import REWARD_COMPONENTS
from common.metrics import MetricLogger
from learner import checkpoint
from learner.td3 import TD3
from replay_server.ingest import RateLimiter
from replay_server.ring import FrameRing
from replay_server.service import open_replay

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device=cuda but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class EpisodeStats:
    reward: float = 0.0
    length: int = 0
    collisions: int = 0
    lane_invasions: int = 0
    components: dict[str, float] = field(default_factory=lambda: dict.fromkeys(REWARD_COMPONENTS, 0.0))

    def add(self, reward: float, info: dict[str, Any]) -> None:
        self.reward += reward
        self.length += 1
        self.collisions += int(info["collision"])
        self.lane_invasions += int(info["lane_invasion"])
        for k, v in info["rewards"].items():
            self.components[k] += v

    def metrics(self) -> dict[str, float]:
        return {
            "train/episode_reward": self.reward,
            "train/episode_length": self.length,
            "train/collisions_per_episode": self.collisions,
            "train/lane_invasions_per_episode": self.lane_invasions,
            **{f"rewards/{k}": v for k, v in self.components.items()},
        }


class SerialRun:
    """`init()` builds every part (or restores them from a checkpoint), `run()` trains."""

    def __init__(self, cfg: Config, run_dir: Path, resume: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume

    def init(self) -> "SerialRun":
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.learner.device)
        self.env = make_env(cfg)
        self.eval_env = make_env(cfg)
        self.agent = TD3(cfg, self.device)
        self.ring = FrameRing(cfg.replay.capacity)
        self.sample_rng = np.random.default_rng([cfg.seed, 1])
        self.actor = Actor(self.agent.actor, cfg, np.random.default_rng([cfg.seed, 2]), self.device)
        self.env_step = 0
        self.episodes = 0
        self.last_eval: dict[str, float] = {}
        if self.resume is not None:
            self._restore(self.resume)
        self.replay = open_replay(cfg, self.run_dir, self.ring)
        self.adder = ChunkAdder(actor_id=0, chunk_steps=cfg.replay.chunk_steps, sink=self.replay.insert)
        r = cfg.replay
        self.limiter = RateLimiter(max(r.min_size_to_sample, cfg.td3.batch_size), r.samples_per_insert, r.error_buffer)
        self.logger = MetricLogger(self.run_dir)
        self.logger.text("config", "```\n" + to_yaml(cfg) + "\n```")
        log.info("run directory: %s (device %s)", self.run_dir, self.device)
        log.info("watch it: tensorboard --logdir %s --host 127.0.0.1", self.run_dir.parent)
        return self

    def _restore(self, path: Path) -> None:
        state, replay = checkpoint.load(path, self.agent)
        self.env_step = int(state["env_step"])
        self.episodes = int(state["episodes"])
        self.sample_rng.bit_generator.state = state["rng"]["sample"]
        self.actor.rng.bit_generator.state = state["rng"]["actor"]
        if replay is not None:
            self.ring = FrameRing.from_state(replay)
        log.info("resumed from %s at env step %d (%d transitions in replay)", path, self.env_step, len(self.ring))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        cfg = self.cfg
        obs = self._start_episode()
        stats = EpisodeStats()
        update_credit = 0.0
        window = {"t": time.perf_counter(), "steps": self.env_step, "updates": self.agent.updates}
        while self.env_step < cfg.learner.max_timesteps:
            action = self.actor.select_action(obs, self.env_step)
            next_obs, reward, terminated, truncated, info = self.env.step(action)
            self.adder.add(action, reward, next_obs, terminated, truncated)
            stats.add(reward, info)
            obs = next_obs
            self.env_step += 1
            if self.env_step % cfg.replay.chunk_steps == 0:
                self.replay.poll()
            if self.env_step > cfg.td3.learning_starts and self.limiter.can_sample(
                len(self.ring), self.ring.head, cfg.td3.batch_size
            ):
                update_credit += cfg.learner.updates_per_step
                while update_credit >= 1.0:
                    update_credit -= 1.0
                    self._learn()
            if terminated or truncated:
                self.logger.log(stats.metrics(), self.env_step)
                self.episodes += 1
                stats = EpisodeStats()
                obs = self._start_episode()
            if self.env_step % 1000 == 0:
                self._log_perf(window)
            if cfg.eval.freq and self.env_step % cfg.eval.freq == 0:
                self._evaluate()
            if self.env_step % cfg.learner.checkpoint_freq == 0:
                self._checkpoint()
        self._drain()
        self._log_perf(window)
        if not (cfg.eval.freq and self.env_step % cfg.eval.freq == 0):
            self._evaluate()  # every run ends with an evaluation, however short its budget
        if self.env_step % cfg.learner.checkpoint_freq:
            self._checkpoint()
        self.close()
        return self.last_eval

    def _start_episode(self) -> dict[str, np.ndarray]:
        obs, _ = self.env.reset(seed=self.cfg.seed + self.episodes)
        self.adder.reset(obs)
        self.actor.on_episode_start()
        return obs

    def _learn(self) -> None:
        batch = Batch.from_numpy(self.limiter.sample(self.ring, self.cfg.td3.batch_size, self.sample_rng), self.device)
        metrics = self.agent.update(batch)
        interval = 10 if self.cfg.logging.debug else self.cfg.logging.log_interval
        if self.agent.updates % interval == 0:
            self.logger.log(metrics, self.env_step)
            if self.cfg.logging.debug:
                log.debug("update %d: %s", self.agent.updates,
                          {k: round(v, 4) for k, v in metrics.items() if k.startswith(("train/", "debug/cnn"))})

    def _log_perf(self, window: dict[str, float]) -> None:
        now = time.perf_counter()
        dt = max(now - window["t"], 1e-9)
        perf = {
            "perf/env_steps_per_s": (self.env_step - window["steps"]) / dt,
            "perf/updates_per_s": (self.agent.updates - window["updates"]) / dt,
            **self.replay.metrics(),
        }
        self.logger.log(perf, self.env_step)
        window.update(t=now, steps=self.env_step, updates=self.agent.updates)
        latest = self.logger.latest
        log.info(
            "step %d/%d | updates %d | episode reward %.1f | %.0f steps/s | %.1f updates/s",
            self.env_step, self.cfg.learner.max_timesteps, self.agent.updates,
            latest.get("train/episode_reward", float("nan")), perf["perf/env_steps_per_s"], perf["perf/updates_per_s"],
        )

    def _evaluate(self) -> dict[str, float]:
        self.agent.actor.eval()
        metrics = evaluate(
            self.eval_env,
            lambda o: self.actor.limit(self.actor.policy_action(o)),
            self.cfg.eval.num_episodes,
            self.cfg.seed + self.cfg.eval.seed_offset,
        )
        self.agent.actor.train()
        self.logger.log(metrics, self.env_step)
        self.last_eval = metrics
        log.info("eval at step %d: %s", self.env_step, {k: round(v, 3) for k, v in metrics.items()})
        return metrics

    def _drain(self) -> None:
        """Sends the episode's partial chunk and reads everything sent into the ring."""
        self.adder.flush()  # a chunk may end mid-episode; the next one continues it
        self.replay.poll()

    def _checkpoint(self) -> Path:
        self._drain()
        state = {
            "episodes": self.episodes,
            "rng": {"sample": self.sample_rng.bit_generator.state, "actor": self.actor.rng.bit_generator.state},
            "config": to_dict(self.cfg),
        }
        # Through Redis, the replay survives in Redis (AOF) and is read back at start instead.
        keep = self.cfg.replay.save_with_checkpoint and not self.cfg.replay.via_redis
        replay = self.ring.state() if keep else None
        path = checkpoint.save(self.run_dir, self.env_step, self.agent, state, replay)
        log.info("checkpoint: %s", path)
        return path

    def close(self) -> None:
        self.replay.close()
        self.logger.close()
        self.env.close()
        self.eval_env.close()
