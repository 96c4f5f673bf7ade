"""A picture of the overview, as a user's browser shows it: `make screenshot`.

Trains a short serial run (or takes `--logdir` of existing runs), serves it with TensorBoard and
has a headless Chromium render the Custom Scalars tab into results/overview.png (the README's
screenshot). Chromium comes from the system (`apt-get install chromium` on Debian/Ubuntu).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.bench.report import RESULTS

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    sys.exit(f"no headless browser found (looked for {', '.join(BROWSERS)}); install one, e.g. apt-get install chromium")


def short_run(logdir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "learner", "--mode", "serial", "--quiet", "--seed", "1", "--max-timesteps", str(steps),
           "--logdir", str(logdir), "--set", "td3.batch_size=64", "--set", "td3.learning_starts=1000",
           "--set", "replay.min_size_to_sample=64", "--set", "eval.freq=1000", "--set", "learner.updates_per_step=0.5",
           "--set", "logging.log_seconds=5"]
    subprocess.run(cmd, check=True)


def serve(logdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as r:
                if len(r.read()) > 2:
                    return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit("TensorBoard did not come up within 60 s")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", type=Path, help="runs to show (default: train a fresh short run)")
    p.add_argument("--steps", type=int, default=3000, help="env steps of the fresh run (default 3000)")
    p.add_argument("--out", type=Path, default=RESULTS / "overview.png")
    p.add_argument("--size", default="1600,2400", help="window width,height in pixels")
    args = p.parse_args()
    chromium = browser()
    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir
        if logdir is None:
            logdir = Path(tmp) / "runs"
            short_run(logdir, args.steps)
        proc, base = serve(logdir)
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={args.size}", "--virtual-time-budget=30000",
                            f"--screenshot={args.out.resolve()}", f"{base}/#custom_scalars"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"overview: {args.out}")


if __name__ == "__main__":
    main()
