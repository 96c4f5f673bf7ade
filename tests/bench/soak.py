"""Soak: the embedded distributed system for MINUTES minutes, watched for leaks and slow-downs.

`make soak MINUTES=30` starts `python -m learner` (2 rollout actors, the evaluator, the Redis
replay; a 20k-transition replay so it is full well within the warm-up), samples the RSS of every
process of the run every 15 s, stops the run with Ctrl-C at the end (it checkpoints), and reports
per process the RSS growth after warm-up (first 25% of the time, at least 2 minutes) as a
least-squares slope in MB/hour, and the throughput drift: env steps/s and updates/s in the last
third of the run over the first third after warm-up. Writes results/soak.json and results/soak.md.
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


def sample(learner: psutil.Process) -> dict[str, float]:
    rss: dict[str, float] = defaultdict(float)
    try:
        procs = [learner, *learner.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for proc in procs:
        name = role(proc, learner.pid)
        if name is None:
            continue
        try:
            rss[name] += proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return dict(rss)


def slope_mb_per_hour(times: list[float], values: list[float]) -> float:
    if len(times) < 3:
        return float("nan")
    return float(np.polyfit(np.asarray(times) / 3600.0, np.asarray(values), 1)[0])


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


def run(minutes: float) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="avtd3-soak-"))
    cmd = [sys.executable, "-m", "learner", "--quiet", "--logdir", str(logdir), "--max-timesteps", "100000000",
           "--num-actors", "2", "--set", "replay.capacity=20000", "--set", "td3.learning_starts=2000",
           "--set", "eval.freq=20000", "--set", "eval.num_episodes=2", "--set", "learner.checkpoint_freq=50000"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    learner = psutil.Process(proc.pid)
    duration, warm_up = minutes * 60.0, max(120.0, 0.25 * minutes * 60.0)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        while time.time() - start < duration and proc.poll() is None:
            t = time.time() - start
            for name, mb in sample(learner).items():
                series[name].append((t, mb))
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
    processes = {}
    for name, points in sorted(series.items()):
        after = [(t, v) for t, v in points if t >= warm_up]
        if len(after) < 2:
            continue
        processes[name] = {
            "rss_mb_at_warm_up": round(after[0][1], 1),
            "rss_mb_at_end": round(after[-1][1], 1),
            "growth_mb": round(after[-1][1] - after[0][1], 1),
            "slope_mb_per_hour": round(slope_mb_per_hour([t for t, _ in after], [v for _, v in after]), 1),
        }
    return {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": minutes,
        "warm_up_minutes": round(warm_up / 60, 1), "run_dir": str(run_dir),
        "processes": processes, "throughput": throughput(run_dir, warm_up, start),
    }


def markdown(report: dict) -> str:
    lines = [f"Soak of {report['minutes']} min (warm-up {report['warm_up_minutes']} min) on {report['machine']}, "
             f"{report['date']}.\n", "| process | RSS after warm-up (MB) | RSS at end (MB) | growth (MB) | slope (MB/h) |",
             "|---|---|---|---|---|"]
    for name, p in report["processes"].items():
        lines.append(f"| {name} | {p['rss_mb_at_warm_up']} | {p['rss_mb_at_end']} | {p['growth_mb']} | {p['slope_mb_per_hour']} |")
    lines += ["", "| throughput | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["throughput"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.soak")
    p.add_argument("--minutes", type=float, default=30.0)
    report = run(p.parse_args().minutes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "soak.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
