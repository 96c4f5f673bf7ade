"""`python -m learner.evaluate RUN_OR_CHECKPOINT`: deterministic episodes of a trained policy, or
of the classical baseline (`--policy baseline`).

Loads the policy of a run (its latest checkpoint) or of one checkpoint, runs N episodes with
seeds --seed, --seed+1, ... on the backend and scenario of the checkpoint's config (or those
given), prints the eval metrics (`--json` also writes them, with every episode), and optionally
writes an animated GIF of chosen episodes. `--policy baseline` drives the privileged driver (IDM, lane changes) on the PID + pure-pursuit
baseline instead, on the config of RUN_OR_CHECKPOINT when given, else of `--config` and `--set`,
and also logs its metrics to TensorBoard under logging.logdir. The held-out evaluations of
`make experiment-learn` go through `evaluate_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from actors.actor import Actor
from actors.baseline import baseline_for
from actors.envs import eval_slot, make_env
from actors.evaluator import MAX_VIDEO_FRAMES, PolicyFn, run_episode_retrying, summarize, video_fps
from common.backends import registered
from common.config import Config, ConfigError, load_config
from common.env import DrivingEnv
from common.metrics import MetricLogger, encode_gif
from learner import checkpoint
from learner.run_dirs import new_run_dir

Evaluation = tuple[dict[str, float], list[dict[str, Any]], bytes | None]
"""(eval metrics, per-episode results, an animated GIF of the chosen episodes or None)."""


def evaluate_policy(cfg: Config, policy_for_env: Callable[[DrivingEnv], PolicyFn], episodes: int, seed: int,
                    video_episodes: set[int] | None = None, video_stride: int = 1) -> Evaluation:
    """`episodes` deterministic episodes from `seed` on the evaluator's env slot of `cfg`; the
    video films every `video_stride`-th step of `video_episodes`."""
    env = make_env(cfg, slot=eval_slot(cfg))
    frames: list = []
    try:
        policy = policy_for_env(env)
        results = [run_episode_retrying(env, policy, seed + i, frames if video_episodes and i in video_episodes else None,
                                        video_stride) for i in range(episodes)]
        gif = encode_gif(frames, video_fps(env)) if frames else None
    finally:
        env.close()
    return summarize(results), results, gif


def evaluate_checkpoint(path: Path, episodes: int, seed: int, overrides: list[str] | None = None,
                        video_episodes: set[int] | None = None, video_stride: int = 1) -> Evaluation:
    """The policy of a checkpoint (or a run's latest) on its own config plus `overrides`."""
    cfg: Config = load_config(overrides=overrides, base=checkpoint.saved_config(path))
    actor = Actor(checkpoint.load_policy(path, cfg), cfg, np.random.default_rng(0), torch.device("cpu"))
    return evaluate_policy(cfg, lambda _: actor.eval_action, episodes, seed, video_episodes, video_stride)


def evaluate_baseline(cfg: Config, episodes: int, seed: int, video_episodes: set[int] | None = None,
                      video_stride: int = 1) -> Evaluation:
    """The classical baseline on `cfg`: the privileged driver (IDM and gap-accepting lane changes on
    the simulator's truth) on PID + pure pursuit, as the evaluator's reference lines use it."""
    return evaluate_policy(cfg, lambda env: baseline_for(cfg, env.backend.dt, env.backend.surroundings), episodes,
                           seed, video_episodes, video_stride)


def log_baseline(cfg: Config, metrics: dict[str, float]) -> Path:
    """Write the baseline's metrics to a TensorBoard run of their own; returns its folder."""
    run_dir = new_run_dir(cfg, "baseline")
    logger = MetricLogger(run_dir)
    logger.log(metrics, 0)
    logger.close()
    return run_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m learner.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="a run directory (its latest checkpoint) or one checkpoint directory; "
                   "optional with --policy baseline")
    p.add_argument("--policy", choices=["checkpoint", "baseline"], default="checkpoint",
                   help="what drives: the checkpoint's policy (default) or the classical baseline (privileged IDM + lane changes on PID + pure pursuit)")
    p.add_argument("--config", help="YAML config file for --policy baseline without a path (see deploy/configs/)")
    p.add_argument("--episodes", type=int, default=10, help="deterministic episodes (default 10)")
    p.add_argument("--seed", type=int, default=100_000,
                   help="seed of the first episode (default 100000: far from training and periodic-eval seeds)")
    p.add_argument("--backend", help=f"simulator, one of {sorted(registered())} (default: the checkpoint's)")
    p.add_argument("--scenario", type=int, choices=[0, 1, 2], help="traffic scenario (default: the checkpoint's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key of the checkpoint's config, e.g. env.max_episode_steps=2000")
    p.add_argument("--json", metavar="PATH", help="also write the metrics and every episode's result to this file")
    p.add_argument("--video", metavar="FILE.gif", help="write the episodes of --video-episodes as one animated GIF")
    p.add_argument("--video-episodes", default="0", help="comma-separated episode indices for --video (default 0)")
    p.add_argument("--video-stride", type=int, default=1,
                   help=f"film every Nth step (default 1): the video holds {MAX_VIDEO_FRAMES} frames, so 3 shows "
                        "a 900-step episode whole, at 3x speed")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[Evaluation, Path | None]:
    """The evaluation the arguments ask for, and the baseline's TensorBoard folder (None for a checkpoint)."""
    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"env.backend={args.backend}")
    if args.scenario is not None:
        overrides.append(f"env.scenario={args.scenario}")
    if args.episodes < 1:
        raise ConfigError(f"--episodes={args.episodes} must be >= 1")
    chosen = {int(i) for i in args.video_episodes.split(",") if i.strip()} if args.video else set()
    if any(not 0 <= i < args.episodes for i in chosen):
        raise ConfigError(f"--video-episodes={args.video_episodes} must be indices in [0, {args.episodes})")
    if args.video_stride < 1:
        raise ConfigError(f"--video-stride={args.video_stride} must be >= 1")
    if args.path and args.config:
        raise ConfigError("give a run or checkpoint path or --config, not both")
    if args.policy == "checkpoint":
        if not args.path:
            raise ConfigError("--policy checkpoint needs a run or checkpoint path")
        return evaluate_checkpoint(Path(args.path), args.episodes, args.seed, overrides, chosen, args.video_stride), None
    base = checkpoint.saved_config(Path(args.path)) if args.path else None
    cfg = load_config(args.config, overrides, base=base)
    evaluation = evaluate_baseline(cfg, args.episodes, args.seed, chosen, args.video_stride)
    return evaluation, log_baseline(cfg, evaluation[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (metrics, results, gif), logged = run(args)
    except (ValueError, checkpoint.CheckpointError) as exc:  # ValueError: ConfigError, bad --video-episodes
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        print(f"{key:28s} {value:10.3f}")
    if logged:
        print(f"logged to {logged}")
    if args.json:
        Path(args.json).write_text(json.dumps({"metrics": metrics, "episodes": results, "seed": args.seed}, indent=1))
    if args.video and gif:
        Path(args.video).write_bytes(gif)
        print(f"video: {args.video} ({len(gif) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
