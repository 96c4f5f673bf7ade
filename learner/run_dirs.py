"""Run folders under `logging.logdir`, and `<logdir>/latest`, which names the newest.

`latest` is a text file holding the newest run folder's name, as `checkpoints/latest` names the
newest checkpoint, not a symlink: TensorBoard follows links, so `--logdir runs` would list the
newest run twice, and some filesystems have none. `checkpoint.resolve` follows it, so
`python -m learner.evaluate runs/latest` and `--resume runs/latest` take the newest run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from common.config import Config

log = logging.getLogger(__name__)
LATEST = "latest"


def new_run_dir(cfg: Config, kind: str = "") -> Path:
    """`<logdir>/<date>-<time>_[<kind>_]<backend>_s<seed>`, with -2, -3, ... when a run of that name
    exists (two runs started within one second); `kind` names what is not a training run (baseline)."""
    label = f"{kind}_" if kind else ""
    base = Path(cfg.logging.logdir) / f"{time.strftime('%Y%m%d-%H%M%S')}_{label}{cfg.env.backend}_s{cfg.seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def mark_latest(run_dir: Path) -> Path | None:
    """Writes `run_dir`'s name to `<logdir>/latest`, replaced atomically (of two runs starting at
    once, one wins whole); returns it, or None where a folder of that name is in the way."""
    pointer = run_dir.parent / LATEST
    if pointer.is_dir():
        log.warning("%s is a folder, not the pointer to the newest run: left alone", pointer)
        return None
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    tmp.write_text(run_dir.name)
    os.replace(tmp, pointer)
    return pointer


def latest_run(logdir: Path) -> Path:
    """The run folder `<logdir>/latest` names."""
    return logdir / (logdir / LATEST).read_text().strip()
