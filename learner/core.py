"""What every run has, serial or distributed: the agent, the ring and the replay feeding it, the
learner step, the logger, the counters, checkpoints and the perf window."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common.config import Config, flat_hparams, for_display, to_dict
from common.driving import vector_dim
from common.memory import release_free_heap
from common.metrics import MetricLogger, TerminationWindow
from common.profiles import device_kind
from learner import checkpoint
from learner.learner import Learner, rss_and_gpu_metrics
from learner.td3 import TD3
from replay_server.ring import FrameRing
from replay_server.service import open_replay

log = logging.getLogger(__name__)
HPARAM_METRICS = ("eval/mean_reward", "eval/success_rate", "eval/collision_rate", "eval/route_progress_pct",
                  "train/episode_reward")
"""The HPARAMS tab's metric columns: each run's latest value of these tags."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device=cuda but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device_kind(name))


class TrainingCore:
    """Builds (or restores) the learner side of a run. `saved` holds the role-specific state the
    checkpoint carried (for example the serial actor's RNG)."""

    def __init__(self, cfg: Config, run_dir: Path, resume: Path | None, via_redis: bool) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        torch.manual_seed(cfg.seed)
        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        self.device = pick_device(cfg.learner.device)
        self.agent = TD3(cfg, self.device)
        self.ring = FrameRing(cfg.replay.capacity, vector_dim=vector_dim(cfg.env))
        self.sample_rng = np.random.default_rng([cfg.seed, 1])
        self.env_step = 0
        self.episodes = 0
        self.resumes = 0
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = 0
        self.last_video: bytes | None = None
        self.last_checkpoint: Path | None = None
        self.started = time.monotonic()
        self.saved: dict[str, Any] = {}
        self.via_redis = via_redis
        if resume is not None:
            self._restore(resume)
        self.replay = open_replay(cfg, run_dir, self.ring, via_redis)
        self.logger = MetricLogger(run_dir)
        self.logger.text("config", "```\n" + yaml.safe_dump(for_display(cfg), sort_keys=False) + "\n```")
        self.logger.hparams(flat_hparams(cfg), HPARAM_METRICS)
        self.terminations = TerminationWindow(cfg.logging.episode_window)
        self.learner = Learner(self.agent, self.ring, cfg, self.logger, self.sample_rng)
        if resume is not None:
            self.logger.log({"alerts/learner_resumes": self.resumes}, self.env_step)
        self._window = (time.perf_counter(), self.env_step, self.agent.updates)
        log.info("learner on %s", self.device)  # the CLI prints the run directory and TensorBoard command

    def _restore(self, path: Path) -> None:
        state, replay = checkpoint.load(path, self.agent)
        self.env_step = int(state["env_step"])
        self.episodes = int(state["episodes"])
        self.resumes = int(state.get("resumes", 0)) + 1
        self.sample_rng.bit_generator.state = state["rng"]["sample"]
        self.saved = state.get("role", {})
        if replay is not None:
            self.ring = FrameRing.from_state(replay)
        log.info("resumed from %s at env step %d (%d transitions in the saved replay)", path, self.env_step, len(self.ring))

    @property
    def window_start_step(self) -> int:
        """The env step of the last perf log."""
        return self._window[1]

    def log_perf(self, extra: dict[str, float] | None = None, actor_steps: dict[int, int] | None = None) -> dict[str, float]:
        """perf/* over the window since the last call; `actor_steps` (env steps per actor in that
        window) become per-actor rates over the very same window, so they add up to the total."""
        now = time.perf_counter()
        t0, steps0, updates0 = self._window
        dt = max(now - t0, 1e-9)
        perf = {
            **{f"perf/env_steps_per_s_actor{i}": n / dt for i, n in (actor_steps or {}).items()},
            "perf/env_steps_per_s": (self.env_step - steps0) / dt,
            "perf/updates_per_s": (self.agent.updates - updates0) / dt,
            # What the loop around the updates costs: in a run whose learner sets the pace, the
            # share not spent in them is reports, replay polling, publication and evaluation.
            "perf/learner_busy_fraction": self.learner.step_seconds / dt,
            **({"perf/learner_step_ms": 1e3 * self.learner.step_seconds / (self.agent.updates - updates0)}
               if self.agent.updates > updates0 else {}),
            # Not logged for a window in which the actors were held back for the debt: its updates
            # over no env step at all would read as a ratio of hundreds and swamp the series.
            **({"perf/updates_per_env_step": (self.agent.updates - updates0) / (self.env_step - steps0)}
               if self.env_step > steps0 else {}),
            **self.replay.metrics(),
            "perf/learner_heap_released_mb": release_free_heap(),  # before the RSS is read
            **rss_and_gpu_metrics(self.device),
            **(extra or {}),
        }
        self.logger.log(perf, self.env_step)
        self._window = (now, self.env_step, self.agent.updates)
        self.learner.step_seconds = 0.0
        return perf

    def log_episode(self, episode: dict[str, float]) -> None:
        """A finished training episode (from any actor), with termination fractions over recent ones."""
        self.logger.log(self.terminations.apply(episode), self.env_step)
        self.episodes += 1

    def log_eval(self, metrics: dict[str, float], env_step: int | None = None,
                 video: tuple[bytes | None, tuple[int, int]] = (None, (0, 0))) -> None:
        """Eval metrics at `env_step`, the step whose weights were evaluated (default: now), and
        the GIF of its first episode with its (height, width), if filmed."""
        step = self.env_step if env_step is None else env_step
        self.logger.log(metrics, step)
        gif, size = video
        if gif:
            self.logger.video("eval/video", gif, size, step)
            self.last_video = gif
        self.last_eval, self.last_eval_step = metrics, step
        log.info("eval at step %d: return %.1f, success %.2f, collisions %.2f, %.0f steps, %.1f m/s (baseline: success %s)",
                 step, metrics["eval/mean_reward"], metrics["eval/success_rate"], metrics["eval/collision_rate"],
                 metrics["eval/avg_episode_length"], metrics["eval/mean_speed"],
                 f"{metrics['eval/baseline_success_rate']:.2f}" if "eval/baseline_success_rate" in metrics else "off")

    @property
    def reached_target(self) -> bool:
        """The latest evaluation reached `learner.stop_at_success`, which ends the run."""
        target = self.cfg.learner.stop_at_success
        return bool(target) and self.last_eval.get("eval/success_rate", -1.0) >= target

    def progress(self) -> str:
        """The status line's end: the latest evaluation's success and the time since start."""
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        success = f"{self.last_eval['eval/success_rate']:.2f} at {self.last_eval_step}" if self.last_eval else "-"
        return f"eval success {success} | {minutes}:{seconds:02d} elapsed"

    def wrap_up(self) -> str:
        """Writes the last evaluation's video to eval.gif in the run folder; returns what the
        finished run leaves, for the console: its last evaluation, checkpoint and video."""
        lines = [f"finished at env step {self.env_step}: {self.progress()}"
                 + (f" (reached learner.stop_at_success={self.cfg.learner.stop_at_success})" if self.reached_target else "")]
        if self.last_checkpoint is not None:
            lines.append(f"checkpoint:       {self.last_checkpoint}")
        if self.last_video:
            video = self.run_dir / "eval.gif"
            video.write_bytes(self.last_video)
            lines.append(f"evaluation video: {video} (the evaluation at env step {self.last_eval_step}, first episode)")
        return "\n".join(lines)

    def checkpoint(self, role_state: dict[str, Any]) -> Path:
        """Writes a checkpoint; `role_state` (JSON) comes back as `saved` on resume."""
        self.replay.poll()
        state = {
            "episodes": self.episodes,
            "resumes": self.resumes,
            "rng": {"sample": self.sample_rng.bit_generator.state},
            "config": to_dict(self.cfg),
            "role": role_state,
        }
        # Through Redis, the replay survives in Redis (AOF) and is read back at start instead.
        keep = self.cfg.replay.save_with_checkpoint and not self.via_redis
        path = checkpoint.save(self.run_dir, self.env_step, self.agent, state, self.ring.state() if keep else None)
        log.info("checkpoint: %s", path)
        self.last_checkpoint = path
        return path

    def close(self) -> None:
        self.replay.close()
        self.logger.close()
