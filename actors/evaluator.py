"""Deterministic evaluation episodes and the seeds' eval metrics."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

from actors.actor import Actor, acting_device
from actors.baseline import baseline_for
from actors.envs import eval_slot, make_env
from common.config import Config, from_dict
from common.driving import COLLISION_KINDS, EVAL_ONLY_TERMINATIONS
from common.env import DrivingEnv, SimulatorFailure
from common.memory import release_free_heap
from common.metrics import encode_gif
from common.networks import policy_for
from common.weights import load_policy_bytes

log = logging.getLogger(__name__)

PolicyFn = Callable[[dict[str, np.ndarray]], np.ndarray]
"""Observation -> action; a policy with a `reset()` method (the baseline's PID) is reset at each episode start."""
MAX_VIDEO_FRAMES = 300
"""Steps filmed per video episode (30 s of the embedded simulator, 15 s of CARLA)."""
EPISODE_ATTEMPTS = 3


def annotate(frame: np.ndarray, lines: list[str]) -> np.ndarray:
    """`frame` with `lines` of text drawn over a dark band at its top."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, image.width, 12 * len(lines) + 4), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((4, 2 + 12 * i), line, fill=(255, 255, 255))
    return np.asarray(image)


def run_episode(env: DrivingEnv, policy: PolicyFn, seed: int, frames: list | None = None,
                stride: int = 1) -> dict[str, float | str | None]:
    """One deterministic episode. With `frames`, appends a picture of every `stride`-th step (up to
    `MAX_VIDEO_FRAMES`) with the step, speed, action and reward drawn on it, then a last picture
    naming the termination reason, held for one second of the video."""
    obs, _ = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset()
    total, steps, invasions, braked, speed, done = 0.0, 0, 0, 0, 0.0, False
    info: dict = {}
    while not done:
        action = policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        steps += 1
        invasions += int(info["lane_invasion"])
        braked += int(info["aeb"])
        speed += info["speed"]
        done = terminated or truncated
        if frames is not None and steps % stride == 0 and len(frames) < MAX_VIDEO_FRAMES:
            frames.append(annotate(env.render(), [
                f"step {steps}  {info['speed']:4.1f} m/s  return {total:6.1f}",
                f"steer {action[0]:+.2f}  throttle {action[1]:+.2f}  reward {reward:+.2f}",
                f"route {info['progress_pct']:5.1f}%  lane invasions {invasions}",
            ]))
    if frames is not None:
        last = annotate(env.render(), [f"end: {info['termination']} at step {steps}",
                                       f"route {info['progress']:.0f} m ({info['progress_pct']:.0f}%)",
                                       f"lane invasions {invasions}  return {total:.1f}"])
        frames.extend([last] * video_fps(env))
    return {"reward": total, "length": steps, "lane_invasions": invasions, "aeb_steps": braked,
            "termination": info["termination"],
            "collision_kind": info.get("collision_kind") if info["termination"] == "collision" else None,
            "mean_speed": speed / steps, "progress_m": info["progress"], "progress_pct": info["progress_pct"]}


def video_fps(env: DrivingEnv) -> int:
    """Frames per second that play an episode in real time (one frame per env step)."""
    return max(1, round(1.0 / env.backend.dt))


def run_episode_retrying(env: DrivingEnv, policy: PolicyFn, seed: int, frames: list | None = None,
                         stride: int = 1) -> dict[str, Any]:
    """`run_episode`, run again from its start when the simulator fails under it."""
    for attempt in range(1, EPISODE_ATTEMPTS + 1):
        try:
            return run_episode(env, policy, seed, frames, stride)
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


def evaluate_filmed(env: DrivingEnv, policy: PolicyFn, episodes: int, seed: int,
                    video: bool) -> tuple[dict[str, float], bytes | None, tuple[int, int]]:
    """`evaluate`, and with `video` an animated GIF of the first episode and its (height, width)."""
    frames: list | None = [] if video else None
    metrics = evaluate(env, policy, episodes, seed, frames)
    gif, shape = (encode_gif(frames, video_fps(env)), frames[0].shape[:2]) if frames else (None, (0, 0))
    del frames
    # A video of up to 300 frames is freed here, and glibc would keep its pages: the evaluator's
    # RSS then rose with its longest episode so far (+58 MB in a soak), which reads as a leak.
    release_free_heap()
    return metrics, gif, shape


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
        "eval/aeb_steps": sum(r["aeb_steps"] for r in results) / max(sum(r["length"] for r in results), 1),
        "eval/mean_speed": float(np.mean([r["mean_speed"] for r in results])),
        "eval/route_progress_m": float(np.mean([r["progress_m"] for r in results])),
        "eval/route_progress_pct": float(np.mean([r["progress_pct"] for r in results])),
        # The other ways to end: a collision and a completed route are the two rates above.
        **{f"eval/termination_{t}": reasons.count(t) / episodes for t in EVAL_ONLY_TERMINATIONS},
        # What the collisions hit: the kinds add up to eval/collision_rate.
        **{f"eval/collision_{k}": sum(r.get("collision_kind") == k for r in results) / episodes for k in COLLISION_KINDS},
    }


REFERENCE_KEYS = {"baseline": ("mean_reward", "success_rate", "collision_rate", "route_progress_pct"),
                  "random": ("mean_reward",)}


def reference_results(env: DrivingEnv, cfg: Config, episodes: int, seed: int) -> dict[str, dict[str, float]]:
    """eval/* of a uniformly random policy and of the classical baseline (PID + pure pursuit)
    on the evaluation seeds `seed`, `seed + 1`, ...: what a learning curve is read against."""
    rng = np.random.default_rng(0)
    return {
        "random": evaluate(env, lambda _: rng.uniform(-1, 1, 2).astype(np.float32), episodes, seed),
        "baseline": evaluate(env, baseline_for(cfg, env.backend.dt, env.backend.surroundings), episodes, seed),
    }


def reference_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`reference_results` as the eval/baseline_* and eval/random_* constants logged with every evaluation."""
    return {f"eval/{who}_{k}": results[who][f"eval/{k}"] for who, keys in REFERENCE_KEYS.items() for k in keys}


class References:
    """The reference lines of a run, evaluated on its first evaluation only: the evaluation
    seeds never change, so neither do the baseline's and the random policy's results."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.lines: dict[str, float] | None = None

    def __call__(self, env: DrivingEnv, seed: int) -> dict[str, float]:
        if not self.cfg.eval.references:
            return {}
        if self.lines is None:
            self.lines = reference_metrics(reference_results(env, self.cfg, self.cfg.eval.num_episodes, seed))
        return self.lines


class EvalWorker:
    """The evaluator process (a Ray actor in distributed mode): its own env and policy (on `actors.device`)."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.cfg = from_dict(cfg_dict)
        self.env = make_env(self.cfg, slot=eval_slot(self.cfg))
        device = acting_device(self.cfg)
        self.actor = Actor(policy_for(self.cfg).eval().to(device), self.cfg, np.random.default_rng(0), device)
        self.references = References(self.cfg)

    def evaluate(self, weights: bytes, seed: int, video: bool) -> tuple[dict[str, float], bytes | None, tuple[int, int]]:
        """Metrics of `eval.num_episodes` deterministic episodes under `weights`, and a GIF of the first."""
        load_policy_bytes(self.actor.policy, weights)
        metrics, gif, shape = evaluate_filmed(self.env, self.actor.eval_action, self.cfg.eval.num_episodes, seed, video)
        return metrics | self.references(self.env, seed), gif, shape
