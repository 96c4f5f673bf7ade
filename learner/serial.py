"""Serial mode: one process wires env -> actor -> chunk adder -> replay -> ring -> TD3
learner, the same objects the distributed mode spreads over processes. Chunks go straight into
the ring, or through the Redis replay service with `replay.via_redis`. For laptops, tests and
debugging.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from actors.actor import Actor
from actors.adder import ChunkAdder
from actors.envs import backend_spec, make_env
from actors.evaluator import References, evaluate_filmed
from actors.runner import EpisodeRunner
from common.backends import aggregate
from common.config import Config
from learner.core import TrainingCore

log = logging.getLogger(__name__)


class SerialRun:
    """`init()` builds every part (or restores them from a checkpoint), `run()` trains."""

    def __init__(self, cfg: Config, run_dir: Path, resume: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume

    def init(self) -> "SerialRun":
        cfg = self.cfg
        # The envs first: a simulator that cannot start then leaves no run directory or Redis behind.
        self.env = make_env(cfg, training=True)
        try:
            self.eval_env = make_env(cfg, slot=1)
        except BaseException:
            self.env.close()
            raise
        self.core = TrainingCore(cfg, self.run_dir, self.resume, via_redis=cfg.replay.via_redis)
        self.actor = Actor(self.core.agent.actor, cfg, np.random.default_rng([cfg.seed, 2]), self.core.device,
                           surroundings=self.env.backend.surroundings)
        if "actor_rng" in self.core.saved:
            self.actor.rng.bit_generator.state = self.core.saved["actor_rng"]
        self.adder = ChunkAdder(actor_id=0, chunk_steps=cfg.replay.chunk_steps, sink=self.core.replay.insert)
        self.references = References(cfg)
        return self

    @property
    def nonfinite(self) -> int:
        return self.runner.nonfinite

    def run(self) -> dict[str, float]:
        cfg, core = self.cfg, self.core
        self.runner = EpisodeRunner(self.env, self.actor, self.adder, cfg.seed, first_episode=core.episodes)
        update_credit = 0.0
        while core.env_step < cfg.learner.max_timesteps and not core.reached_target:
            finished = self.runner.step(core.env_step)
            core.env_step += 1
            if core.env_step % cfg.replay.chunk_steps == 0:
                core.replay.poll()
            if core.learner.ready(core.env_step):
                update_credit += cfg.learner.updates_per_step
                while update_credit >= 1.0:
                    update_credit -= 1.0
                    core.learner.step(core.env_step)
            if finished is not None:
                core.log_episode(finished)
            if core.env_step % 1000 == 0:
                self._log_perf()
            if cfg.eval.freq and core.env_step % cfg.eval.freq == 0:
                self._evaluate()
            if core.env_step % cfg.learner.checkpoint_freq == 0:
                self._checkpoint()
        self.adder.flush()
        core.replay.poll()
        if core.env_step % 1000:
            self._log_perf()
        if not (cfg.eval.freq and core.env_step % cfg.eval.freq == 0):
            self._evaluate()  # every run ends with an evaluation, however short its budget
        if core.env_step % cfg.learner.checkpoint_freq:
            self._checkpoint()
        self.close()
        return core.last_eval

    def _log_perf(self) -> None:
        core = self.core
        perf = core.log_perf({
            "actors/nonfinite_dropped": self.nonfinite,
            "actors/simulator_failures": self.runner.simulator_failures,
            **aggregate(backend_spec(self.cfg), [self.env.backend.metrics()]),
        })
        log.info(
            "step %d/%d | updates %d | episode reward %.1f | %.0f steps/s | %.1f updates/s | %s",
            core.env_step, self.cfg.learner.max_timesteps, core.agent.updates,
            core.logger.latest.get("train/episode_reward", float("nan")),
            perf["perf/env_steps_per_s"], perf["perf/updates_per_s"], core.progress(),
        )

    def _evaluate(self) -> None:
        policy = self.core.agent.actor
        policy.eval()
        seed = self.cfg.seed + self.cfg.eval.seed_offset
        metrics, gif, size = evaluate_filmed(self.eval_env, self.actor.eval_action, self.cfg.eval.num_episodes, seed,
                                             self.cfg.eval.video)
        policy.train()
        self.core.log_eval(metrics | self.references(self.eval_env, seed), video=(gif, size))

    def _checkpoint(self) -> None:
        self.adder.flush()  # a chunk may end mid-episode; the next one continues it
        self.core.checkpoint({"actor_rng": self.actor.rng.bit_generator.state})

    def close(self) -> None:
        self.core.close()
        self.env.close()
        self.eval_env.close()
