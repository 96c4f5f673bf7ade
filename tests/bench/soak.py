"""Soak: the embedded distributed system for MINUTES minutes, watched for leaks and slow-downs.

`make soak MINUTES=30` starts `python -m learner` (2 rollout actors, the evaluator, the Redis
replay; a 20k-transition replay and 0.02 updates per env step, so that the replay is full well
within the warm-up: a replay still filling grows the learner by design; the CPU learner still
sets the pace, holding the actors back on its debt now and then, so the drift is mostly its own),
samples the RSS of every process of the run every
15 s, stops the run with Ctrl-C at the end (it checkpoints), and reports per process the RSS
growth after warm-up (first 25% of the time, at least 2 minutes) as a least-squares slope in
MB/hour, and as a robust (Theil-Sen) slope that samples catching a passing allocation do not
tilt, held to 20 MB/hour; the same for the USS (memory
private to the process: RSS also counts the pages of Ray's shared object store that a process
touched, which the object store bounds); and the throughput drift: env steps/s and updates/s in
the last third of the run over the first third after warm-up. Writes results/soak.json (with
every sample) and results/soak.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

from common.metrics import read_scalars
from tests.bench.report import RESULTS, machine

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_EVERY_S = 15.0
SLOPE_TARGET_MB_PER_HOUR = 20.0


def role(proc: psutil.Process, learner_pid: int) -> str | None:
    """A stable name for a process of the run (None for short-lived helpers)."""
    if proc.pid == learner_pid:
        return "learner"
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if "redis-server" in cmd or name == "redis-server":
        return "redis-server"
    if cmd.startswith("ray::"):
        return f"{cmd.split()[0].split('.')[0]} (pid {proc.pid})"  # ray::RolloutWorker.run -> ray::RolloutWorker
    for part in ("raylet", "gcs_server", "dashboard.py", "log_monitor.py", "monitor.py", "dashboard/agent.py",
                 "runtime_env/agent"):
        if part in cmd:
            return part.replace(".py", "").rsplit("/", 1)[-1]
    return None


def sample(learner: psutil.Process) -> dict[str, tuple[float, float]]:
    """(RSS, USS) in MB per process role."""
    mb: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    try:
        procs = [learner, *learner.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for proc in procs:
        name = role(proc, learner.pid)
        if name is None:
            continue
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, uss = mb[name]
        mb[name] = (rss + info.rss / 2**20, uss + info.uss / 2**20)
    return dict(mb)


def slope_mb_per_hour(times: list[float], values: list[float]) -> float:
    if len(times) < 3:
        return float("nan")
    return float(np.polyfit(np.asarray(times) / 3600.0, np.asarray(values), 1)[0])


def robust_slope_mb_per_hour(times: list[float], values: list[float]) -> float:
    """Theil-Sen: the median of the slopes between every pair of samples. A sample that catches an
    update's batch or an evaluation's video in flight, or one taken just after a trim, moves it no
    more than any other sample, where it can tilt a least-squares line by tens of MB/hour in 30
    minutes; a steady leak still reads at its rate."""
    t, v = np.asarray(times) / 3600.0, np.asarray(values)
    i, j = np.triu_indices(len(t), k=1)
    keep = t[j] > t[i]
    if keep.sum() < 3:
        return float("nan")
    return float(np.median((v[j] - v[i])[keep] / (t[j] - t[i])[keep]))


def throughput(run_dir: Path, warm_up_s: float, start_wall: float) -> dict[str, float]:
    logged = read_scalars(run_dir)
    out = {}
    for tag in ("perf/env_steps_per_s", "perf/updates_per_s"):
        values = [v for wall, _, v in logged.get(tag, []) if wall - start_wall >= warm_up_s]
        third = len(values) // 3
        if third == 0:
            continue
        first = float(np.mean(values[:third]))
        last = float(np.mean(values[-third:]))
        key = tag.split("/")[1]
        out[f"{key} first third"] = first
        out[f"{key} last third"] = last
        out[f"{key} drift (last/first)"] = last / first if first else float("nan")
    return out


def growth(kind: str, times: list[float], values: list[float]) -> dict[str, float]:
    """`kind`'s memory after warm-up, at the end, their difference and the least-squares slope."""
    return {
        f"{kind}_mb_at_warm_up": round(values[0], 1),
        f"{kind}_mb_at_end": round(values[-1], 1),
        f"{kind}_growth_mb": round(values[-1] - values[0], 1),
        f"{kind}_slope_mb_per_hour": round(slope_mb_per_hour(times, values), 1),
        f"{kind}_robust_slope_mb_per_hour": round(robust_slope_mb_per_hour(times, values), 1),
    }


def trimmed_learner_rss(run_dir: Path, warm_up_s: float, start_wall: float) -> dict[str, float]:
    """The learner's own `perf/learner_rss_mb`, read right after it hands its free heap back
    (`release_free_heap`): its live memory, without the hundreds of MB an update frees and glibc
    keeps for a while, which make the sampled RSS swing by +-60 MB and its slope noise."""
    points = [(wall - start_wall, v) for wall, _, v in read_scalars(run_dir).get("perf/learner_rss_mb", [])
              if wall - start_wall >= warm_up_s]
    if len(points) < 3:
        return {}
    return growth("rss", [t for t, _ in points], [v for _, v in points])


def per_process(series: dict[str, list], warm_up_s: float) -> dict[str, dict[str, float]]:
    """Growth of every process's (time, RSS, USS) samples after the warm-up."""
    processes = {}
    for name, points in sorted(series.items()):
        after = [p for p in points if p[0] >= warm_up_s]
        if len(after) < 2:
            continue
        times = [p[0] for p in after]
        processes[name] = growth("rss", times, [p[1] for p in after]) | growth("uss", times, [p[2] for p in after])
    return processes


def run(minutes: float) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="avtd3-soak-"))
    cmd = [sys.executable, "-m", "learner", "--quiet", "--logdir", str(logdir), "--max-timesteps", "100000000",
           "--num-actors", "2", "--set", "replay.capacity=20000", "--set", "td3.learning_starts=2000",
           "--set", "eval.freq=20000", "--set", "eval.num_episodes=2", "--set", "learner.checkpoint_freq=50000",
           "--set", "learner.updates_per_step=0.02"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    learner = psutil.Process(proc.pid)
    duration, warm_up = minutes * 60.0, max(120.0, 0.25 * minutes * 60.0)
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    try:
        while time.time() - start < duration and proc.poll() is None:
            t = time.time() - start
            for name, (rss, uss) in sample(learner).items():
                series[name].append((t, rss, uss))
            time.sleep(SAMPLE_EVERY_S)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
    if proc.returncode not in (0, None):
        raise RuntimeError(f"the soaked run exited with {proc.returncode}; its run folder: {logdir}")
    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    return {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": minutes,
        "warm_up_minutes": round(warm_up / 60, 1), "run_dir": str(run_dir),
        "processes": per_process(series, warm_up), "learner_after_heap_trim": trimmed_learner_rss(run_dir, warm_up, start),
        "throughput": throughput(run_dir, warm_up, start),
        "samples": {name: [[round(x, 1) for x in p] for p in points] for name, points in sorted(series.items())},
    }


def markdown(report: dict) -> str:
    lines = [f"Soak of {report['minutes']} min (warm-up {report['warm_up_minutes']} min) on {report['machine']}, "
             f"{report['date']}. USS is the memory private to a process; RSS also counts the shared pages "
             "(Ray's object store) it touched.\n",
             "The robust slope is Theil-Sen's (the median of the slopes between every pair of samples): a "
             "sample that catches an update's batch or an evaluation's video in flight does not tilt it.\n",
             "| process | RSS after warm-up (MB) | RSS at end (MB) | RSS growth (MB) | RSS slope (MB/h) | "
             "RSS robust slope (MB/h) | USS after warm-up (MB) | USS growth (MB) | USS slope (MB/h) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, p in report["processes"].items():
        lines.append(f"| {name} | {p['rss_mb_at_warm_up']} | {p['rss_mb_at_end']} | {p['rss_growth_mb']} | "
                     f"{p['rss_slope_mb_per_hour']} | {p['rss_robust_slope_mb_per_hour']} | {p['uss_mb_at_warm_up']} | "
                     f"{p['uss_growth_mb']} | {p['uss_slope_mb_per_hour']} |")
    robust = {name: p["rss_robust_slope_mb_per_hour"] for name, p in report["processes"].items()}
    worst = max(robust, key=lambda name: robust[name])
    verdict = "yes" if robust[worst] < SLOPE_TARGET_MB_PER_HOUR else "**no**"
    lines += ["", f"Every process's robust RSS slope below {SLOPE_TARGET_MB_PER_HOUR:.0f} MB/hour: {verdict} "
              f"(highest: {worst}, {robust[worst]} MB/hour)."]
    trimmed = report.get("learner_after_heap_trim")
    if trimmed:
        lines += ["", "The learner's RSS as it logs it (`perf/learner_rss_mb`, every 5 s, right after handing its free "
                  "heap back): its live memory, without the swing of what an update frees.", "",
                  "| process | RSS after warm-up (MB) | RSS at end (MB) | RSS growth (MB) | RSS slope (MB/h) |",
                  "|---|---|---|---|---|",
                  f"| learner (after heap trim) | {trimmed['rss_mb_at_warm_up']} | {trimmed['rss_mb_at_end']} | "
                  f"{trimmed['rss_growth_mb']} | {trimmed['rss_slope_mb_per_hour']} |"]
    lines += ["", "| throughput | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["throughput"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.soak")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rescore", type=Path, metavar="SOAK_JSON",
                   help="no run: recompute the per-process figures from the samples a soak saved")
    args = p.parse_args()
    if args.rescore:
        report = json.loads(args.rescore.read_text())
        report["processes"] = per_process(report["samples"], report["warm_up_minutes"] * 60.0)
    else:
        report = run(args.minutes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "soak.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
