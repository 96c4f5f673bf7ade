"""`python -m learner.evaluate RUN_OR_CHECKPOINT`: deterministic episodes of a trained policy.

Loads the policy of a run (its latest checkpoint) or of one checkpoint, runs N episodes with
seeds --seed, --seed+1, ... on the backend and scenario of the checkpoint's config (or those
given), prints the eval metrics (`--json` also writes them, with every episode), and optionally
writes an animated GIF of chosen episodes. The held-out evaluations of `make experiment-learn`
go through `evaluate_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.actor import Actor
from actors.envs import eval_slot, make_env
from actors.evaluator import run_episode_retrying, summarize, video_fps
from common.config import Config, ConfigError, load_config
from common.metrics import encode_gif
from learner import checkpoint


def evaluate_checkpoint(path: Path, episodes: int, seed: int, overrides: list[str] | None = None,
                        video_episodes: set[int] | None = None) -> tuple[dict[str, float], list[dict[str, Any]], bytes | None]:
    """(eval metrics, per-episode results, an animated GIF of `video_episodes` or None)."""
    cfg: Config = load_config(overrides=overrides, base=checkpoint.saved_config(path))
    policy = checkpoint.load_policy(path, cfg)
    actor = Actor(policy, cfg, np.random.default_rng(0), torch.device("cpu"))
    env = make_env(cfg, slot=eval_slot(cfg))
    frames: list = []
    try:
        results = [run_episode_retrying(env, actor.eval_action, seed + i,
                                        frames if video_episodes and i in video_episodes else None)
                   for i in range(episodes)]
        gif = encode_gif(frames, video_fps(env)) if frames else None
    finally:
        env.close()
    return summarize(results), results, gif


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m learner.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a run directory (its latest checkpoint) or one checkpoint directory")
    p.add_argument("--episodes", type=int, default=10, help="deterministic episodes (default 10)")
    p.add_argument("--seed", type=int, default=100_000,
                   help="seed of the first episode (default 100000: far from training and periodic-eval seeds)")
    p.add_argument("--backend", choices=["embedded", "carla"], help="simulator (default: the checkpoint's)")
    p.add_argument("--scenario", type=int, choices=[0, 1, 2], help="traffic scenario (default: the checkpoint's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key of the checkpoint's config, e.g. env.max_episode_steps=2000")
    p.add_argument("--json", metavar="PATH", help="also write the metrics and every episode's result to this file")
    p.add_argument("--video", metavar="FILE.gif", help="write the episodes of --video-episodes as one animated GIF")
    p.add_argument("--video-episodes", default="0", help="comma-separated episode indices for --video (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"env.backend={args.backend}")
    if args.scenario is not None:
        overrides.append(f"env.scenario={args.scenario}")
    try:
        if args.episodes < 1:
            raise ConfigError(f"--episodes={args.episodes} must be >= 1")
        chosen = {int(i) for i in args.video_episodes.split(",") if i.strip()} if args.video else set()
        if any(not 0 <= i < args.episodes for i in chosen):
            raise ConfigError(f"--video-episodes={args.video_episodes} must be indices in [0, {args.episodes})")
        metrics, results, gif = evaluate_checkpoint(Path(args.path), args.episodes, args.seed, overrides, chosen)
    except (ValueError, checkpoint.CheckpointError) as exc:  # ValueError: ConfigError, bad --video-episodes
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in metrics.items():
        print(f"{key:28s} {value:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"metrics": metrics, "episodes": results, "seed": args.seed}, indent=1))
    if args.video and gif:
        Path(args.video).write_bytes(gif)
        print(f"video: {args.video} ({len(gif) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
