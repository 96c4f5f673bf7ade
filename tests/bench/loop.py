"""`make bench-loop`: what the learner's loop costs in a distributed run (issue #12, item 3).

Times our update at batch 256 on the learner's device as `make bench-learner` does (sampled from
an in-process ring, the config's defaults: bf16 autocast and channels_last on CUDA), then runs
`python -m learner --mode distributed` on the same device for `--seconds`, with more updates owed
per env step than the learner can pay, so that it sets the pace; stops it with Ctrl-C and reads
its perf points after learning starts: updates/s (`perf/updates_per_s`, reports, Redis polling,
weight publication and evaluations all included), the share of time in its steps
(`perf/learner_busy_fraction`) and the step time. Target: the run's updates/s >= 0.9x the bench's.
On a CPU the actors share the learner's cores, so there the ratio also measures that contention;
the busy fraction is the loop's own share.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.metrics import read_scalars
from replay_server.ring import FrameRing
from tests.bench.learner import BATCH, fill_ring, ours, timed_updates
from tests.bench.report import write_report

ROOT = Path(__file__).resolve().parents[2]
LEARNING_STARTS = 2000
TARGET = 0.9


def bench_rate(device: torch.device) -> float:
    ring = FrameRing(20_000)
    fill_ring(ring, 20_000)
    return ours(device, ring, timed_updates(device))


def run_learner(device: torch.device, actors: int, seconds: float, logdir: Path) -> Path:
    """The run's directory, after `seconds` of training (past learning_starts) and a Ctrl-C."""
    cmd = [sys.executable, "-m", "learner", "--mode", "distributed", "--quiet", "--logdir", str(logdir),
           "--max-timesteps", str(10**8), "--num-actors", str(actors), "--device", device.type,
           "--set", f"td3.batch_size={BATCH}", "--set", f"td3.learning_starts={LEARNING_STARTS}",
           "--set", "learner.updates_per_step=8", "--set", "learner.ray_dashboard=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        proc.wait(timeout=seconds)
        raise RuntimeError(f"the learner exited early with code {proc.returncode}")
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # stops and checkpoints, as a user's Ctrl-C
        proc.wait(timeout=120)
    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run_dir


def run(seconds: float, actors: int) -> dict[str, float | str]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = bench_rate(device)
    with tempfile.TemporaryDirectory() as tmp:
        scalars = read_scalars(run_learner(device, actors, seconds, Path(tmp)))

    def after_start(tag: str) -> list[float]:
        points = [value for _, step, value in scalars.get(tag, []) if step > LEARNING_STARTS]
        return points[1:]  # the first window still holds time before learning started

    rates = after_start("perf/updates_per_s")
    if not rates:
        raise RuntimeError(f"no perf point after learning_starts in {seconds:.0f} s: give it --seconds more")
    return {
        "device": device.type,
        "rollout actors": float(actors),
        "bench: our updates/s, b256, from an in-process ring": bench,
        "run: perf points after learning starts": float(len(rates)),
        "run: updates/s (median)": float(np.median(rates)),
        "run: learner busy fraction (median)": float(np.median(after_start("perf/learner_busy_fraction"))),
        "run: learner step ms (median)": float(np.median(after_start("perf/learner_step_ms"))),
        "run / bench": float(np.median(rates)) / bench,
        "target": TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the distributed run trains")
    parser.add_argument("--actors", type=int, default=max(1, (os.cpu_count() or 2) - 4),
                        help="rollout actors (default: this machine's cores less 4, at least 1)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.actors < 1:
        parser.error("--seconds must be > 0 and --actors >= 1")
    write_report("loop", run(args.seconds, args.actors))


if __name__ == "__main__":
    main()
