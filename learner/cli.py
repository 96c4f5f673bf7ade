"""`python -m learner`: parse the command line into a Config and start a run."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from actors.envs import check_backend
from common.config import Config, ConfigError, load_config
from common.errors import ActorsFailing, ServiceUnavailable
from common.profiles import describe
from learner import checkpoint
from learner.run_dirs import mark_latest, new_run_dir

# The old system's flags, kept so its users' scripts keep working: flag -> config key.
ALIASES = {
    "scenario": "env.scenario",
    "max_timesteps": "learner.max_timesteps",
    "eval_freq": "eval.freq",
    "checkpoint_freq": "learner.checkpoint_freq",
    "num_eval_episodes": "eval.num_episodes",
    "seed": "seed",
    "device": "learner.device",
    "logdir": "logging.logdir",
    "mode": "mode",
    "num_actors": "actors.num_actors",
    "ray_address": "learner.ray_address",
    "redis_url": "replay.redis_url",
    "stop_at_success": "learner.stop_at_success",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m learner", description="Train a TD3 driving policy from camera images.")
    p.add_argument("--config", help="YAML config file (see deploy/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set td3.batch_size=128 (repeatable)")
    p.add_argument("--scenario", type=int, choices=[0, 1, 2], help="traffic: 0 a slow lead car, 1 traffic in the way, 2 dense (env.scenario)")
    p.add_argument("--max-timesteps", type=int, help="env-step budget (learner.max_timesteps)")
    p.add_argument("--eval-freq", type=int, help="env steps between evaluations (eval.freq)")
    p.add_argument("--checkpoint-freq", type=int, help="env steps between checkpoints (learner.checkpoint_freq)")
    p.add_argument("--num-eval-episodes", type=int, help="episodes per evaluation (eval.num_episodes)")
    p.add_argument("--seed", type=int, help="seed of the run (seed)")
    p.add_argument("--debug", action="store_true", help="frequent diagnostics and debug log lines (logging.debug)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="learner device (learner.device)")
    p.add_argument("--logdir", help="directory of run folders, default runs/ (logging.logdir)")
    p.add_argument("--mode", choices=["serial", "distributed"],
                   help="distributed (default): Ray actors + evaluator + Redis replay; serial: one process (mode)")
    p.add_argument("--num-actors", type=int, help="rollout actors in distributed mode (actors.num_actors)")
    p.add_argument("--ray-address", help="join a Ray cluster: auto or HOST:PORT (learner.ray_address)")
    p.add_argument("--redis-url", help="use this Redis for the replay instead of launching one (replay.redis_url)")
    p.add_argument("--stop-at-success", type=float, metavar="RATE",
                   help="end the run at the first evaluation whose success rate reaches RATE, e.g. 1.0 "
                        "(learner.stop_at_success)")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of a live status line (logging.quiet)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue the newest run under --logdir, or the run/checkpoint at PATH")
    return p


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    for flag, key in ALIASES.items():
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.debug:
        out.append("logging.debug=true")
    if args.quiet:
        out.append("logging.quiet=true")
    return out


def find_resume(spec: str, logdir: Path) -> Path:
    if spec != "latest":
        return checkpoint.resolve(Path(spec))
    runs = sorted((p for p in logdir.glob("*/checkpoints/latest")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise checkpoint.CheckpointError(f"--resume latest: no run with a checkpoint under '{logdir}'")
    return checkpoint.resolve(runs[-1].parent.parent)


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The run's config and, when resuming, the checkpoint to restore."""
    overrides = overrides_from_args(args)
    if args.resume is None:
        return load_config(args.config, overrides), None
    probe = load_config(args.config, overrides)  # catches typos before looking for runs
    ckpt = find_resume(args.resume, Path(probe.logging.logdir))
    saved = checkpoint.saved_config(ckpt)
    # The run continues with its own config; flags given now still apply on top (e.g. a larger budget).
    cfg = load_config(args.config, overrides, base=saved)
    return cfg, ckpt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, ckpt = resolve_config(args)
        check_backend(cfg)
    except (ConfigError, checkpoint.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if cfg.logging.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if cfg.mode == "serial":
        from learner.serial import SerialRun as Run
    else:
        from learner.distributed import DistributedRun as Run

    run_dir = ckpt.parent.parent if ckpt is not None else new_run_dir(cfg)
    print(f"run directory: {run_dir}\nwatch it:      tensorboard --logdir {run_dir.parent} --host 127.0.0.1 "
          "(or: make tensorboard), then open http://127.0.0.1:6006/#custom_scalars (the overview)\n"
          f"{describe(cfg)}", flush=True)
    try:
        run = Run(cfg, run_dir, resume=ckpt).init()
        mark_latest(run_dir)
        run.run()
    except (ServiceUnavailable, ActorsFailing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{run.core.wrap_up()}\nevaluate it:      python -m learner.evaluate {run_dir} --video out.gif", flush=True)
    return 0
