"""The two experiments of the README's Results, each a set of serial runs of `python -m learner`
read back from their TensorBoard events:

- `norm` (`make experiment-norm`): the seeds' diagnosis on our own runs. Same seed, same env-step
  budget, one process per arm, run side by side: `cnn.norm=layernorm` (the fix) against
  `cnn.norm=none` (optionally `none-nowd`: also without CNN weight decay; `old`: none of the fixes).
  Curves of the per-sample CNN feature L2 norm, critic and actor loss, Q and episode reward, and
  the seeds' criteria per arm (feature L2 < 100 throughout, feature mean in [-10, 10], std < 50,
  critic loss < 100 and falling, no NaN/inf).
- `learn` (`make experiment-learn`): a learning curve on embedded scenario 0: eval return and
  success rate every `--eval-every` steps for the learned policy, against a random policy and the
  PID + pure-pursuit baseline on the same evaluation seeds.

Both write PNG plots and a markdown table to results/ and default to budgets that finish within an
hour on 2 CPU cores (batch 64); `--steps` and `--set key=value` scale them up on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.bench.report import RESULTS, machine

ROOT = Path(__file__).resolve().parents[2]
CPU_FRIENDLY = ["td3.batch_size=64", "replay.min_size_to_sample=64", "td3.learning_starts=1000"]
ARMS = {
    "layernorm": ["cnn.norm=layernorm"],
    "none": ["cnn.norm=none"],
    "none-nowd": ["cnn.norm=none", "td3.cnn_weight_decay=0"],
    # The old system: no normalization, no CNN weight decay, no clipping to speak of, no adaptive LR.
    "old": ["cnn.norm=none", "td3.cnn_weight_decay=0", "td3.actor_grad_clip=1e9", "td3.critic_grad_clip=1e9",
            "learner.feature_l2_threshold=1e30", "td3.cnn_lr=3e-4"],
}
CURVES = {
    "debug/cnn_features_l2_norm": "actor CNN feature L2 (per sample)",
    "debug/critic_cnn_features_l2_norm": "critic CNN feature L2 (per sample)",
    "train/critic_loss": "critic loss",
    "train/actor_loss": "actor loss",
    "debug/q1_mean": "Q1 mean",
    "train/episode_reward": "episode reward",
}


def start_run(logdir: Path, steps: int, overrides: list[str], seed: int) -> subprocess.Popen:
    """A serial run on one CPU thread, logging diagnostics every 25 updates."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    cmd = [sys.executable, "-m", "learner", "--mode", "serial", "--quiet", "--seed", str(seed),
           "--max-timesteps", str(steps), "--logdir", str(logdir), "--set", "logging.log_interval=25", *sets]
    shutil.rmtree(logdir, ignore_errors=True)  # one run per arm folder: a rerun replaces it
    logdir.mkdir(parents=True)
    log = open(logdir / "stdout.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_all(procs: dict[str, subprocess.Popen], logdir: Path) -> None:
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"run '{name}' failed (exit {proc.returncode}); see {logdir / name / 'stdout.log'}")


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path, log_tags: set[str], title: str,
         hlines: dict[str, dict[str, float]] | None = None) -> None:
    """One panel per tag, one line per arm; `hlines[tag][label]` draws constant references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (tag, series) in zip(axes.flat, panels.items()):
        for arm, points in series.items():
            if points:
                ax.plot(*zip(*points), label=arm, linewidth=1.2)
        for label, value in (hlines or {}).get(tag, {}).items():
            ax.axhline(value, linestyle="--", linewidth=1.0, label=label, color="gray" if "random" in label else "black")
        if tag in log_tags and all(v > 0 for pts in series.values() for _, v in pts):
            ax.set_yscale("log")
        ax.set_title(CURVES.get(tag, tag), fontsize=10)
        ax.set_xlabel("env step")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the normalization experiment ---------------------------------------------------------------
def criteria(data: dict[str, list[tuple[int, float]]]) -> dict[str, object]:
    """The seeds' criteria on one arm's logs."""
    def values(tag: str) -> np.ndarray:
        return np.array([v for _, v in data.get(tag, [])], dtype=np.float64)

    l2 = np.concatenate([values("debug/cnn_features_l2_norm"), values("debug/critic_cnn_features_l2_norm")])
    mean = np.concatenate([values("debug/cnn_feature_mean"), values("debug/critic_cnn_feature_mean")])
    std = np.concatenate([values("debug/cnn_feature_std"), values("debug/critic_cnn_feature_std")])
    loss, actor_loss, cnn_lr = values("train/critic_loss"), values("train/actor_loss"), values("agent/cnn_lr")
    third = max(len(loss) // 3, 1)
    first, last = (float(loss[:third].mean()), float(loss[-third:].mean())) if loss.size else (math.nan, math.nan)
    everything = np.concatenate([values(t) for t in data])
    nonfinite = int(values("alerts/nonfinite_loss").sum()) + int((~np.isfinite(everything)).sum())
    return {
        "max feature L2": float(np.max(l2)) if l2.size else math.nan,
        "feature L2 < 100 throughout": bool(l2.size and np.all(l2 < 100)),
        "feature mean range": (float(mean.min()), float(mean.max())) if mean.size else (math.nan, math.nan),
        "feature mean in [-10, 10]": bool(mean.size and np.all(np.abs(mean) <= 10)),
        "max feature std": float(std.max()) if std.size else math.nan,
        "feature std < 50": bool(std.size and np.all(std < 50)),
        "critic loss first / last third": (first, last),
        "critic loss < 100 and falling": bool(last < 100 and last < first),
        "actor loss range": (float(actor_loss.min()), float(actor_loss.max())) if actor_loss.size else (math.nan, math.nan),
        "non-finite values or skipped updates": nonfinite,
        "no NaN or inf": nonfinite == 0,
        "CNN lr halvings (adaptive LR)": int(round(math.log2(cnn_lr[0] / cnn_lr[-1]))) if cnn_lr.size else 0,
    }


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, tuple):
        return " / ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def experiment_norm(steps: int, arms: list[str], seed: int, overrides: list[str]) -> None:
    out = RESULTS / "experiment_norm"
    start = time.time()
    # An arm whose folder holds a finished run of the same budget, seed and overrides is reused,
    # so that adding an arm later (--arms layernorm,none,old) runs only the new one.
    markers = {arm: {"steps": steps, "seed": seed,
                     "overrides": [*CPU_FRIENDLY, "eval.freq=0", "eval.num_episodes=3", *overrides, *ARMS[arm]]}
               for arm in arms}
    procs = {}
    for arm, marker in markers.items():
        done = out / arm / "finished.json"
        if done.is_file() and json.loads(done.read_text()) == marker:
            print(f"arm '{arm}': reusing the finished run in {out / arm}")
            continue
        procs[arm] = start_run(out / arm, steps, marker["overrides"], seed)
    wait_all(procs, out)
    for arm in procs:
        (out / arm / "finished.json").write_text(json.dumps(markers[arm]))
    data = {arm: scalars(out / arm) for arm in arms}
    panels = {tag: {arm: data[arm].get(tag, []) for arm in arms} for tag in CURVES}
    plot(panels, RESULTS / "experiment_norm.png", {"debug/cnn_features_l2_norm", "debug/critic_cnn_features_l2_norm",
                                                   "train/critic_loss"},
         f"cnn.norm ablation, seed {seed}, {steps} env steps ({', '.join(arms)})")
    table = {arm: criteria(data[arm]) for arm in arms}
    rows = list(next(iter(table.values())))
    md = [f"`make experiment-norm` ({steps} env steps per arm, seed {seed}, serial runs of one CPU thread each, "
          f"{(time.time() - start) / 60:.0f} min) on {machine()}, {time.strftime('%Y-%m-%d %H:%M')}. "
          f"Overrides: {' '.join([*CPU_FRIENDLY, *overrides]) or 'none'}.\n",
          "| criterion | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    md += [f"| {row} | " + " | ".join(_fmt(table[a][row]) for a in arms) + " |" for row in rows]
    md += ["", "![curves](experiment_norm.png)", ""]
    (RESULTS / "experiment_norm.md").write_text("\n".join(md))
    (RESULTS / "experiment_norm.json").write_text(json.dumps(table, indent=1))
    print("\n".join(md))


# -- the learning-curve experiment --------------------------------------------------------------
def reference_policies(overrides: list[str], seed: int, episodes: int) -> dict[str, dict[str, float]]:
    """eval/* of a uniformly random policy and of the baseline, on the learner's evaluation seeds."""
    from actors.baseline import baseline_for
    from actors.envs import make_env
    from actors.evaluator import evaluate
    from common.config import load_config

    cfg = load_config(overrides=[*overrides, f"seed={seed}"])
    env = make_env(cfg)
    rng = np.random.default_rng(seed)
    eval_seed = cfg.seed + cfg.eval.seed_offset
    try:
        return {
            "random policy": evaluate(env, lambda _: rng.uniform(-1, 1, 2).astype(np.float32), episodes, eval_seed),
            "PID + pure pursuit": evaluate(env, baseline_for(cfg, env.backend.dt), episodes, eval_seed),
        }
    finally:
        env.close()


def experiment_learn(steps: int, eval_every: int, episodes: int, seed: int, overrides: list[str]) -> None:
    out = RESULTS / "experiment_learn"
    start = time.time()
    run_overrides = [*CPU_FRIENDLY, "env.scenario=0", f"eval.freq={eval_every}", f"eval.num_episodes={episodes}", *overrides]
    proc = start_run(out / "td3", steps, run_overrides, seed)
    refs = reference_policies(["env.scenario=0", *overrides], seed, episodes)
    wait_all({"td3": proc}, out)
    data = scalars(out / "td3")
    tags = ["eval/mean_reward", "eval/success_rate"]
    panels = {tag: {"TD3 (learned)": data.get(tag, [])} for tag in tags}
    hlines = {tag: {name: m[tag] for name, m in refs.items()} for tag in tags}
    plot(panels, RESULTS / "experiment_learn.png", set(), f"embedded scenario 0, seed {seed}, {episodes} eval episodes per point",
         hlines)
    md = [f"`make experiment-learn` ({steps} env steps, eval every {eval_every} steps on {episodes} episodes, seed {seed}, "
          f"{(time.time() - start) / 60:.0f} min) on {machine()}, {time.strftime('%Y-%m-%d %H:%M')}. "
          f"Overrides: {' '.join(run_overrides)}.\n",
          "| policy | env step | eval return | success rate | collision rate | avg episode length |", "|---|---|---|---|---|---|"]
    learned = {tag: dict(data.get(tag, [])) for tag in ("eval/mean_reward", "eval/success_rate", "eval/collision_rate",
                                                          "eval/avg_episode_length")}
    for step in sorted(learned["eval/mean_reward"]):
        md.append(f"| TD3 | {step} | {learned['eval/mean_reward'][step]:.1f} | {learned['eval/success_rate'][step]:.2f} | "
                  f"{learned['eval/collision_rate'].get(step, math.nan):.2f} | {learned['eval/avg_episode_length'].get(step, math.nan):.0f} |")
    for name, m in refs.items():
        md.append(f"| {name} | — | {m['eval/mean_reward']:.1f} | {m['eval/success_rate']:.2f} | {m['eval/collision_rate']:.2f} | "
                  f"{m['eval/avg_episode_length']:.0f} |")
    md += ["", "![learning curve](experiment_learn.png)", ""]
    (RESULTS / "experiment_learn.md").write_text("\n".join(md))
    (RESULTS / "experiment_learn.json").write_text(json.dumps({"td3": learned, **refs}, indent=1, default=str))
    print("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.experiments")
    sub = p.add_subparsers(dest="which", required=True)
    norm = sub.add_parser("norm", help="LayerNorm vs no normalization, the seeds' criteria")
    norm.add_argument("--steps", type=int, default=8000, help="env steps per arm (default 8000: ~35 min on 2 CPU cores)")
    norm.add_argument("--arms", default="layernorm,none", help=f"comma-separated, from {', '.join(ARMS)}")
    learn = sub.add_parser("learn", help="learning curve vs random policy and the classical baseline")
    learn.add_argument("--steps", type=int, default=10000, help="env steps (default 10000: ~50 min on 2 CPU cores)")
    learn.add_argument("--eval-every", type=int, default=1000)
    learn.add_argument("--episodes", type=int, default=5, help="eval episodes per point")
    for sp in (norm, learn):
        sp.add_argument("--seed", type=int, default=42)
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set td3.batch_size=256 --set learner.device=cuda")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.which == "norm":
        arms = args.arms.split(",")
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
        experiment_norm(args.steps, arms, args.seed, args.overrides)
    else:
        experiment_learn(args.steps, args.eval_every, args.episodes, args.seed, args.overrides)


if __name__ == "__main__":
    main()
