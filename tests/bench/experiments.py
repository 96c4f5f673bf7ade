"""The two experiments of results/README.md, each a set of serial runs of `python -m learner`
read back from their TensorBoard events:

- `norm` (`make experiment-norm`): the seeds' diagnosis on our own runs. Same seed, same env-step
  budget, one process per arm, run side by side: `cnn.norm=layernorm` (the fix) against
  `cnn.norm=none` (optionally `none-nowd`: also without CNN weight decay; `old`: none of the fixes).
  Curves of the per-sample CNN feature L2 norm, critic and actor loss, Q and episode reward, and
  the seeds' criteria per arm (feature L2 < 100 throughout, feature mean in [-10, 10], std < 50,
  critic loss < 100 and falling, no NaN/inf).
- `learn` (`make experiment-learn`): does the agent learn to drive? Arms (`--arms`: our configs,
  the seeds' arrangement, ablations that change one switch, and the SB3 TD3 peers of
  `tests/bench/peer.py`) times training seeds (`--seeds`), same budget, run `--parallel` at a time;
  each run ends with an evaluation on `--episodes` held-out seeds (100000 on, used by no training
  episode), and the uniformly random policy and the PID + pure-pursuit baseline are evaluated on
  the same seeds. One table (per-seed success and collision rates, the lock criterion: saturated
  fraction after step 5,000) and one plot of the periodic eval return per arm and seed.

Both write PNG plots and markdown tables to results/ and default to CPU-sized budgets (batch 64);
`--steps` and `--set key=value` scale them up on a GPU.
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

from common.metrics import read_scalars
from tests.bench.peer import PEERS
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


def learner_cmd(seed: int, steps: int, logdir: Path, args: list[str], mode: str = "serial") -> list[str]:
    """A `python -m learner` run in `mode`; `args` are further command-line arguments (--config, --set)."""
    return [sys.executable, "-m", "learner", "--mode", mode, "--quiet", "--seed", str(seed),
            "--max-timesteps", str(steps), "--logdir", str(logdir), *args]


def spawn(cmd: list[str], folder: Path, one_thread: bool = True) -> subprocess.Popen:
    """`cmd` (on one CPU thread if `one_thread`), its output in folder/stdout.log and its start time
    in folder/started; the folder is emptied first (a rerun replaces it)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "started").write_text(repr(time.time()))
    log = open(folder / "stdout.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if one_thread else None
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def start_run(logdir: Path, steps: int, overrides: list[str], seed: int) -> subprocess.Popen:
    """A serial run on one CPU thread, logging diagnostics every 25 updates."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return spawn(learner_cmd(seed, steps, logdir, ["--set", "logging.log_interval=25", *sets]), logdir)


def wait_all(procs: dict[str, subprocess.Popen], logdir: Path) -> None:
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"run '{name}' failed (exit {proc.returncode}); see {logdir / name / 'stdout.log'}")


def run_folder(logdir: Path) -> Path:
    """The one run folder `python -m learner --logdir logdir` created."""
    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run_dir


def by_step(raw: dict[str, list[tuple[float, int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """`read_scalars` output without the wall times: tag -> [(step, value)]."""
    return {tag: [(step, value) for _, step, value in points] for tag, points in raw.items()}


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    return by_step(read_scalars(run_folder(logdir)))


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
    td, target = values("debug/td_error_q1"), np.abs(values("debug/q_target_mean"))
    # the loss grows with the values as the agent learns; the TD error relative to the targets does not
    relative = ((float(td[:third].mean() / target[:third].mean()), float(td[-third:].mean() / target[-third:].mean()))
                if td.size and td.size == target.size else (math.nan, math.nan))
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
        "TD error / TD target first / last third": relative,
        "actor loss range": (float(actor_loss.min()), float(actor_loss.max())) if actor_loss.size else (math.nan, math.nan),
        "non-finite values or skipped updates": nonfinite,
        "no NaN or inf": nonfinite == 0,
        "CNN lr halvings (adaptive LR)": int(round(math.log2(cnn_lr[0] / cnn_lr[-1]))) if cnn_lr.size else 0,
    }


def _fmt(v: object, between: str = " / ") -> str:
    """A criterion's value for a table; a tuple's parts joined by `between`."""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, tuple):
        return between.join(_fmt(x) for x in v)
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


# -- the learning experiment: arms x training seeds, held-out final evaluation ----------------------
# Each arm is a set of overrides on top of CPU_FRIENDLY (and the learn budget); "seeds" is the seeds'
# arrangement (deploy/configs/seeds.yaml), the others isolate one change on either side of it.
GUIDE = ["actors.warmup_actions=privileged", "actors.guide_fraction=0.25"]
"""The privileged driver drives a quarter of the training episodes (issue 37's guide arms)."""
LEARN_ARMS: dict[str, list[str]] = {
    "default": [],
    "seeds": ["--config", "deploy/configs/seeds.yaml"],
    "seeds+trunk": ["--config", "deploy/configs/seeds.yaml", "cnn.trunk_dim=50"],
    "seeds+penalty": ["--config", "deploy/configs/seeds.yaml", "td3.pretanh_penalty=1.0"],
    "seeds+warmup": ["--config", "deploy/configs/seeds.yaml", "td3.critic_warmup_updates=1000"],
    "seeds+adamw": ["--config", "deploy/configs/seeds.yaml", "td3.weight_decay_style=decoupled"],
    "default-trunk": ["cnn.trunk_dim=0"],
    "default-penalty": ["td3.pretanh_penalty=0"],
    "default-warmup": ["td3.critic_warmup_updates=0"],
    "default-encoder": ["td3.actor_encoder=own"],
    "default-adamw": ["td3.weight_decay_style=l2"],
    "default-augment": ["td3.augment_shift=0"],
    "default-camera": ["env.embedded.camera_vehicles=highway"],
    "default-tau": ["td3.tau=0.005"],
    "default-nstep": ["td3.n_step=1"],
    "default-tau-nstep": ["td3.tau=0.005", "td3.n_step=1"],
    "default+nstep5": ["td3.n_step=5"],
    "default-noise": ["actors.expl_noise_start=0.3"],
    "default-gate": ["env.reward.lane_keeping_speed_gate=false"],
    # The default before braking stopped the car (2026-12-03): reversing brake, ungated lane keeping.
    "default-gate+reverse": ["env.reward.lane_keeping_speed_gate=false", "env.embedded.brake_reverses=true"],
    "default+start-anywhere": ["env.embedded.training_start=anywhere"],
    "default+start-anywhere-lead": ["env.embedded.training_start=anywhere_with_lead"],
    "default-lookahead-per-point": ["env.lookahead_features=metres"],
    "default-stuck": ["env.stuck_after_s=0"],
    "default-stuck-progress-cap": ["env.stuck_after_s=0", "env.reward.progress_speed_cap=false"],
    "default-progress-cap": ["env.reward.progress_speed_cap=false"],
    # 3,000 warm-up steps: about eight of the baseline's drives round the route, S-bend included.
    "default+baseline-warmup": ["actors.warmup_actions=baseline", "td3.learning_starts=3000"],
    # Issue 37: the privileged driver's overtakes in the replay before the first update (5,000 steps,
    # a dozen drives round the route), since TD3's Gaussian noise rarely strings a lane change and
    # back together.
    "default+privileged-warmup": ["actors.warmup_actions=privileged", "td3.learning_starts=5000"],
    # Issue 37: the camera centred 12 m ahead of the ego, so a stopped or slower car shows 36 m ahead.
    "default+camera-ahead": ["env.embedded.camera_ahead_m=12"],
    # Issue 37: most collisions on scenarios 1 and 2 are the ego rear-ending a slow car in its lane; a
    # collision costing 100 instead of 10 (crashing also forfeits the route's remaining reward).
    "default+collision-100": ["env.reward.collision_penalty=100"],
    # Issue 37: the rear-ends come in slow queues (the ego at 2-6 m/s into cars at 0-4 m/s); safety
    # charges up to 3 a step for following closer than 1.5 s, about half the step reward at 8 m/s.
    "default+headway": ["env.reward.headway_penalty=3"],
    # Issue 37: the gap to the vehicle ahead and its closing speed in the vector (a range sensor's
    # reading, CARLA's obstacle sensor), so that keeping the distance need not be read off the frames.
    "default+gap": ["env.gap_features=true"],
    "default+gap+headway": ["env.gap_features=true", "env.reward.headway_penalty=3"],
    # Issue 37: default+gap's held-out routes end off the road in the other lane (0.35 / 0.50 / 0.20),
    # where lane keeping, measured from the route's lane 5 m away, pays nothing wherever the car is:
    # measured from the lane the car is in, staying centred there pays as on the route's lane.
    "default+gap+lane-keeping-lane": ["env.gap_features=true", "env.reward.lane_keeping_reference=lane"],
    # Issue 37: the headway charge (default+headway) once the gap it charges for is in the vector.
    "default+gap+lane-keeping-lane+headway": ["env.gap_features=true", "env.reward.lane_keeping_reference=lane",
                                              "env.reward.headway_penalty=3"],
    # Issue 37: with the gap features the agent rear-ends less and gets further, then leaves the road
    # in the outer lane of the curve after segment e, which fixed starts rarely reach: half the
    # training episodes start anywhere on the track, in either lane, the traffic placed around them.
    "default+gap+start-half-anywhere": ["env.gap_features=true", "env.embedded.training_start=anywhere",
                                        "env.embedded.training_start_fraction=0.5"],
    # Issue 37: emergency braking on the obstacle distance (RSS's safe gap, 2 m margin) under the
    # policy; the traffic-blind PID completes 0.45 of scenario 2's held-out routes with it, 0 without.
    "default+aeb": ["env.aeb_gap_m=2"],
    # Issue 37: default+aeb's policy floored the throttle and let the rule brake half its steps. Here
    # each braked step costs 5 (about a step's reward), the gap the rule brakes on is in the vector so
    # the critic can tell when it will brake, and lane keeping is measured from the car's lane, where
    # default+gap+lane-keeping-lane's episodes ended against the car ahead.
    "default+gap+lane-keeping-lane+aeb-5": ["env.gap_features=true", "env.reward.lane_keeping_reference=lane",
                                            "env.aeb_gap_m=2", "env.reward.aeb_penalty=5"],
    # Issue 37: with the brake charged, default+gap+lane-keeping-lane+aeb-5's seed 1 stopped on a clear
    # road (stuck 0.70, collisions 0.05): a stop there now costs as much as a collision.
    "default+gap+lane-keeping-lane+aeb-5+stuck-10": ["env.gap_features=true", "env.reward.lane_keeping_reference=lane",
                                                     "env.aeb_gap_m=2", "env.reward.aeb_penalty=5",
                                                     "env.reward.stuck_penalty=10"],
    # Issue 37: with stuck charged too, seed 1 left the road at the edge away from the traffic (0.70):
    # behind a slow car 5 a braked step outweighs the ~1.6 a step earns there, and an exit costs 10
    # once. A charge under what a slow step earns keeps flooring the throttle a loss, not driving on.
    "default+gap+lane-keeping-lane+aeb-1": ["env.gap_features=true", "env.reward.lane_keeping_reference=lane",
                                            "env.aeb_gap_m=2", "env.reward.aeb_penalty=1"],
    # Issue 37: charged 1 the policy floored the throttle again (the rule 48 % of steps), charged 5 it
    # stopped or left the road: the charge between them.
    "default+gap+lane-keeping-lane+aeb-3": ["env.gap_features=true", "env.reward.lane_keeping_reference=lane",
                                            "env.aeb_gap_m=2", "env.reward.aeb_penalty=3"],
    # Issue 37: an ablation of perception: the simulator's truth about the 8 nearest vehicles in the
    # vector (highway-env's kinematics observation). Does the agent master the scenarios when it need
    # not read the traffic off the frames, or is what it does with the traffic the problem?
    "default+traffic": ["env.traffic_features=8"],
    # Issue 37: the privileged driver drives a quarter of the training episodes all through the run
    # (its overtakes and the route's far end stay in the replay), and the actor loss clones its
    # actions there (TD3+BC's scaling), so overtakes need not be strung together by Gaussian noise.
    "default+guide-bc": [*GUIDE, "td3.bc_weight=0.5"],
    "default+guide": [*GUIDE],
    # Issue 37: default+guide-bc's held-out episodes end stuck (0.95 on seed 1): braking hard at a
    # standstill with the road ahead clear, where stopping is worth 0 and a collision -10. The
    # stuck termination charges the collision's 10 too.
    "default+guide-bc+stuck-10": [*GUIDE, "td3.bc_weight=0.5", "env.reward.stuck_penalty=10"],
    # Issue 37: with the stuck penalty half of the held-out episodes still end stuck, the policy holding
    # the brake at a standstill as the car ahead drives off: the driver's many steps held behind a car
    # teach "stopped: keep braking" (the inertia problem of driving behaviour cloning, Codevilla et al.
    # 2019). The Q filter clones the driver only where the critic values its action above the policy's.
    "default+guide-bc+stuck-10+qfilter": [*GUIDE, "td3.bc_weight=0.5", "env.reward.stuck_penalty=10",
                                          "td3.bc_q_filter=true"],
    # Issue 37: one update per env step instead of the CPU profile's 0.5 (the CUDA profile's ratio).
    # Issue 37: DAgger-style (Ross et al., 2011): the privileged driver labels every step with what
    # it would do in the state the actor is in, and the actor loss clones the label (TD3+BC's
    # scaling, default+guide-bc's weight). Cloning on the policy's own states, not the driver's
    # drives: a car stopped behind one that left is told to go, where guide-bc learned to stay.
    "default+teacher": ["actors.teacher_labels=true", "td3.bc_weight=0.5"],
    "default+utd1": ["learner.updates_per_step=1"],
    "default+start-half-anywhere": ["env.embedded.training_start=anywhere", "env.embedded.training_start_fraction=0.5"],
    # default+pink and default+route-bootstrap were measured on the north-up camera (the default
    # until 2026-12-05), default+pink-steer on both cameras; see results/README.md.
    "default+pink": ["actors.expl_noise_exponent=[1,1]"],
    "default+pink-steer": ["actors.expl_noise_exponent=[1,0]"],
    "default+route-bootstrap": ["env.route_end_bootstraps=true"],
    "default-heading-up": ["env.embedded.camera_heading_up=false"],
    "default-heading-up+pink-steer": ["env.embedded.camera_heading_up=false", "actors.expl_noise_exponent=[1,0]"],
    # The seeds' fix taken out of a default that learns: item 4 of the learning issue at its full budget.
    "default-layernorm": ["cnn.norm=none"],
    # Prioritized replay against the uniform default (issue 38): Schaul et al.'s proportional PER, beta
    # reaching 1 within 20,000 updates (a 30,000-step CPU run makes ~14,600: it ends near 0.84), and
    # LAP with its paper's alpha 0.4.
    "default+per": ["replay.sampler=per", "replay.per_beta_steps=20000"],
    "default+lap": ["replay.sampler=lap", "replay.per_alpha=0.4"],
}
FAILURE_MODES = [("off-road", "eval/termination_off_road", "{:.2f}"),
                 ("lane departure", "eval/termination_lane_departure", "{:.2f}"),
                 ("timeout", "eval/termination_timeout", "{:.2f}"), ("stuck", "eval/termination_stuck", "{:.2f}"),
                 ("rear-end collisions", "eval/collision_rear_end", "{:.2f}"),
                 ("side collisions", "eval/collision_side", "{:.2f}"),
                 ("lane invasions / episode", "eval/avg_lane_invasions", "{:.2f}"),
                 ("emergency-brake steps", "eval/aeb_steps", "{:.2f}"),
                 ("route progress %", "eval/route_progress_pct", "{:.0f}"), ("speed m/s", "eval/mean_speed", "{:.1f}")]
"""The report's second table: (column, eval tag, format), per seed."""
HELD_OUT_SEED = 100_000  # first held-out evaluation seed: training uses seed + episode, periodic evals seed + 10,000 + i
SEEDS_CRITERIA = ["max feature L2", "max feature std", "critic loss first / last third",
                  "TD error / TD target first / last third", "non-finite values or skipped updates",
                  "CNN lr halvings (adaptive LR)"]
"""The report's third table: the seeds' criteria (`criteria`) that tell the arms apart."""
SATURATION_AFTER = 5000  # the lock criterion (default): saturated fraction after this env step
LEVEL = 0.8  # issue 37's success target: the report gives when a periodic evaluation first reached it


def _cell(metrics: dict[str, float], tag: str, fmt: str) -> str:
    """One failure-mode cell: '—' for a tag the run did not log (a run older than the tag)."""
    return fmt.format(metrics[tag]) if tag in metrics else "—"


def _split(arm: list[str]) -> tuple[list[str], list[str]]:
    """(extra command-line args, overrides) of an arm."""
    if arm[:1] == ["--config"]:
        return arm[:2], arm[2:]
    return [], arm


def learn_job(arm: str, seed: int, steps: int, budget: list[str], out: Path, episodes: int,
              mode: str = "serial") -> tuple[list[str], dict]:
    """The command of one (arm, seed) run and the marker that identifies a finished one."""
    run_dir = out / arm / f"s{seed}"
    if arm in PEERS:
        sets = [a for o in budget for a in ("--set", o)]
        cmd = [sys.executable, "-m", "tests.bench.peer", "--arm", arm, "--seed", str(seed), "--steps", str(steps),
               "--episodes", str(episodes), "--eval-seed", str(HELD_OUT_SEED), "--out", str(run_dir), *sets]
    else:
        extra, overrides = _split(LEARN_ARMS[arm])
        sets = [a for o in [*budget, *overrides] for a in ("--set", o)]
        cmd = learner_cmd(seed, steps, run_dir / "tb", [*extra, *sets], mode)
    return cmd, {"cmd": cmd[1:], "episodes": episodes}


def run_jobs(jobs: dict[tuple[str, int], tuple[list[str], dict]], out: Path, parallel: int, one_thread: bool = True) -> None:
    """Runs the jobs `parallel` at a time, each on one thread unless not `one_thread`; a finished job with the same
    marker is reused."""
    pending = []
    for (arm, seed), (cmd, marker) in jobs.items():
        done = out / arm / f"s{seed}" / "finished.json"
        if done.is_file() and json.loads(done.read_text()) == marker:
            print(f"{arm} seed {seed}: reusing the finished run")
            continue
        pending.append((arm, seed, cmd, marker))
    running: list[tuple[str, int, dict, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < parallel:
            arm, seed, cmd, marker = pending.pop(0)
            print(f"{arm} seed {seed}: started", flush=True)
            running.append((arm, seed, marker, spawn(cmd, out / arm / f"s{seed}", one_thread)))
        time.sleep(2)
        for job in [j for j in running if j[3].poll() is not None]:
            arm, seed, marker, proc = job
            running.remove(job)
            run_dir = out / arm / f"s{seed}"
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} seed {seed} failed (exit {proc.returncode}); see {run_dir / 'stdout.log'}")
            if arm not in PEERS:
                from learner.evaluate import evaluate_checkpoint

                metrics, _, _ = evaluate_checkpoint(run_folder(run_dir / "tb"), marker["episodes"], HELD_OUT_SEED)
                (run_dir / "final.json").write_text(json.dumps({"final": metrics}, indent=1))
            (run_dir / "finished.json").write_text(json.dumps(marker))
            print(f"{arm} seed {seed}: finished", flush=True)


def run_summary(run_dir: Path, saturation_after: int, level: float = LEVEL) -> dict:
    """Held-out final metrics, the eval curve, the lock criterion and when a periodic evaluation
    first reached `level` success (env step and wall-clock seconds from the run's start) of one run."""
    final = json.loads((run_dir / "final.json").read_text())["final"]
    tb = run_dir / "tb"
    if not tb.is_dir():  # a peer: no curve
        return {"final": final, "curve": [], "saturated_after": math.nan}
    raw = read_scalars(run_folder(tb))
    data = by_step(raw)
    started = run_dir / "started"
    reached = [(w, step) for w, step, v in raw.get("eval/success_rate", []) if v >= level]
    first = min(reached, key=lambda x: x[1]) if reached else None
    saturated = [max(v, dict(data.get("debug/action_saturated_throttle", [])).get(step, 0.0))
                 for step, v in data.get("debug/action_saturated_steer", []) if step > saturation_after]
    return {"final": final, "curve": data.get("eval/mean_reward", []),
            "saturated_after": float(np.mean(saturated)) if saturated else math.nan, "criteria": criteria(data),
            "level_step": first[1] if first else None,
            "level_s": first[0] - float(started.read_text()) if first and started.is_file() else None}


def _arm_seeds(arm: str, seeds: list[int]) -> tuple[str, list[int]]:
    """An --arms entry, ARM or ARM:S1/S2 (that arm on those training seeds only), as (ARM, its seeds)."""
    name, _, own = arm.partition(":")
    return name, [int(x) for x in own.split("/")] if own else seeds


def experiment_learn(steps: int, eval_every: int, episodes: int, arms: list[str], seeds: list[int], scenario: int,
                     parallel: int, overrides: list[str], name: str = "", saturation_after: int = SATURATION_AFTER,
                     mode: str = "serial") -> None:
    """The report is results/<name>.{md,png,json} (default name experiment_learn[_s<scenario>]), its runs
    live in results/<name>/<arm>/s<seed>; a finished run with the same command is reused."""
    name = name or (f"experiment_learn_s{scenario}" if scenario else "experiment_learn")
    out = RESULTS / name
    start = time.time()
    budget = [*CPU_FRIENDLY, f"env.scenario={scenario}", f"eval.freq={eval_every}", "eval.num_episodes=5",
              "logging.log_interval=20", *overrides]
    arm_seeds = dict(_arm_seeds(a, seeds) for a in arms)
    arms = list(arm_seeds)
    jobs = {(arm, seed): learn_job(arm, seed, steps, budget, out, episodes, mode)
            for arm in arms for seed in arm_seeds[arm]}
    # A distributed run is a local Ray cluster of its own and takes every core it finds: one at a time.
    distributed = mode == "distributed"
    run_jobs(jobs, out, 1 if distributed else parallel, one_thread=not distributed)
    summary = {arm: {seed: run_summary(out / arm / f"s{seed}", saturation_after) for seed in arm_seeds[arm]}
               for arm in arms}
    fewer = [f"{arm} seed{'s' * (len(s) > 1)} {', '.join(map(str, s))}" for arm, s in arm_seeds.items() if s != seeds]
    refs = reference_policies([f"env.scenario={scenario}", *overrides], episodes)
    tags = ("eval/success_rate", "eval/collision_rate", "eval/mean_reward", "eval/avg_episode_length")
    md = [f"`make experiment-learn` ({mode} mode, embedded scenario {scenario}, {steps} env steps per run, training seeds "
          f"{', '.join(map(str, seeds))}{' (' + '; '.join(fewer) + ')' if fewer else ''}; final evaluation on {episodes} held-out episodes, seeds {HELD_OUT_SEED}+; "
          f"{(time.time() - start) / 60:.0f} min) on {machine()}, {time.strftime('%Y-%m-%d %H:%M')}. "
          f"Overrides: {' '.join(budget)}.\n",
          "| arm | success (per seed) | mean success | collision (per seed) | mean collision | return (mean) | "
          f"episode length (mean) | saturated fraction after step {saturation_after} (per seed) | "
          f"first periodic eval at >= {LEVEL} success: env step, minutes from start (per seed) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        runs = list(summary[arm].values())
        per = {t: [r["final"][t] for r in runs] for t in tags}
        sat = " / ".join("—" if math.isnan(r["saturated_after"]) else f"{r['saturated_after']:.2f}" for r in runs)
        level = " / ".join("never" if r.get("level_step") is None else
                           f"{r['level_step']:,}, " + ("—" if r.get("level_s") is None else f"{r['level_s'] / 60:.1f}")
                           for r in runs)
        md.append(f"| {arm} | {' / '.join(f'{v:.2f}' for v in per['eval/success_rate'])} | "
                  f"{np.mean(per['eval/success_rate']):.2f} | {' / '.join(f'{v:.2f}' for v in per['eval/collision_rate'])} | "
                  f"{np.mean(per['eval/collision_rate']):.2f} | {np.mean(per['eval/mean_reward']):.1f} | "
                  f"{np.mean(per['eval/avg_episode_length']):.0f} | {sat} | {level} |")
    for ref, m in refs.items():
        md.append(f"| {ref} | — | {m['eval/success_rate']:.2f} | — | {m['eval/collision_rate']:.2f} | "
                  f"{m['eval/mean_reward']:.1f} | {m['eval/avg_episode_length']:.0f} | — | — |")
    md += ["", "How the held-out episodes ended and how far they got (per seed; the references' on the same episodes):", "",
           "| arm | " + " | ".join(label for label, _, _ in FAILURE_MODES) + " |", "|---|" + "---|" * len(FAILURE_MODES)]
    for arm in arms:
        finals = [r["final"] for r in summary[arm].values()]
        md.append(f"| {arm} | " + " | ".join(" / ".join(_cell(f, tag, fmt) for f in finals)
                                            for _, tag, fmt in FAILURE_MODES) + " |")
    for ref, m in refs.items():
        md.append(f"| {ref} | " + " | ".join(_cell(m, tag, fmt) for _, tag, fmt in FAILURE_MODES) + " |")
    rows = [f"| {arm} | " + " | ".join(" / ".join(_fmt(c[k], " → ") for c in table) for k in SEEDS_CRITERIA) + " |"
            for arm in arms if (table := [r["criteria"] for r in summary[arm].values() if r.get("criteria")])]
    if rows:  # a peer has no learner logs
        md += ["", "The seeds' criteria on the learner's logs (per seed; actor and critic CNN features together):", "",
               "| arm | " + " | ".join(SEEDS_CRITERIA) + " |", "|---|" + "---|" * len(SEEDS_CRITERIA), *rows]
    panels = {"eval/mean_reward": {f"{arm} s{seed}": r["curve"] for arm in arms for seed, r in summary[arm].items()
                                   if r["curve"]}}
    plot(panels, RESULTS / f"{name}.png", set(),
         f"scenario {scenario}: periodic eval return (5 episodes)",
         {"eval/mean_reward": {name: m["eval/mean_reward"] for name, m in refs.items()}})
    md += ["", f"![learning curves]({name}.png)", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps({"runs": summary, "references": refs}, indent=1, default=str))
    print("\n".join(md))


def reference_policies(overrides: list[str], episodes: int) -> dict[str, dict[str, float]]:
    """eval/* of a uniformly random policy, the privileged baseline (IDM and lane changes on the
    simulator's truth) and the traffic-blind PID + pure pursuit, on the held-out evaluation seeds."""
    from actors.baseline import baseline_for
    from actors.envs import make_env
    from actors.evaluator import evaluate, reference_results
    from common.config import load_config

    cfg = load_config(overrides=overrides)
    env = make_env(cfg)
    try:
        refs = reference_results(env, cfg, episodes, HELD_OUT_SEED)
        blind = evaluate(env, baseline_for(cfg, env.backend.dt), episodes, HELD_OUT_SEED)
    finally:
        env.close()
    return {"random policy": refs["random"], "privileged baseline (IDM + lane change)": refs["baseline"],
            "PID + pure pursuit (traffic-blind)": blind}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.experiments")
    sub = p.add_subparsers(dest="which", required=True)
    norm = sub.add_parser("norm", help="LayerNorm vs no normalization, the seeds' criteria")
    norm.add_argument("--steps", type=int, default=8000, help="env steps per arm (default 8000: ~35 min on 2 CPU cores)")
    norm.add_argument("--arms", default="layernorm,none", help=f"comma-separated, from {', '.join(ARMS)}")
    learn = sub.add_parser("learn", help="arms x seeds, held-out evaluation, baseline, random policy and SB3 peers")
    learn.add_argument("--steps", type=int, default=10000, help="env steps per run (default 10000)")
    learn.add_argument("--eval-every", type=int, default=2500, help="env steps between periodic evaluations (the curves)")
    learn.add_argument("--episodes", type=int, default=20, help="held-out final evaluation episodes per run")
    learn.add_argument("--arms", default="default,seeds,sb3-vector",
                       help=f"comma-separated, from {', '.join([*LEARN_ARMS, *PEERS])}; ARM:1/2 runs that arm "
                            "on training seeds 1 and 2 only")
    learn.add_argument("--seeds", default="1,2,3", help="training seeds, comma-separated")
    learn.add_argument("--scenario", type=int, choices=[0, 1, 2], default=0)
    learn.add_argument("--saturation-after", type=int, default=SATURATION_AFTER,
                       help="env step after which the saturated action fraction is averaged (the lock criterion)")
    learn.add_argument("--name", default="",
                       help="report and run folder name in results/ (default experiment_learn[_s<scenario>])")
    learn.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each (default 2: this machine's cores)")
    learn.add_argument("--mode", choices=["serial", "distributed"], default="serial",
                       help="serial runs (one process, one thread each) or distributed ones (the learner, "
                            "actors.num_actors rollout actors and the evaluator on a local Ray cluster; one at a time)")
    norm.add_argument("--seed", type=int, default=42)
    for sp in (norm, learn):
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
        arms = args.arms.split(",")
        names = []
        for a in arms:
            try:
                names.append(_arm_seeds(a, [])[0])
            except ValueError:
                p.error(f"arm {a!r}: the seeds after ':' are integers joined by '/', e.g. default+per:1/3")
        unknown = [a for a in names if a not in LEARN_ARMS and a not in PEERS]
        if unknown:
            p.error(f"unknown arm(s) {unknown}; choose from {[*LEARN_ARMS, *PEERS]}")
        experiment_learn(args.steps, args.eval_every, args.episodes, arms, [int(x) for x in args.seeds.split(",")],
                         args.scenario, args.parallel, args.overrides, args.name, args.saturation_after, args.mode)


if __name__ == "__main__":
    main()
