"""The one logger: it owns the metric prefixes, and env steps are the shared x-axis."""

from __future__ import annotations

import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

PREFIXES = (
    "train/", "eval/", "debug/", "perf/", "replay/", "actors/", "alerts/", "gradients/", "agent/", "rewards/",
)


class MetricLogger:
    """Scalars and text to TensorBoard under `logdir`; rejects tags outside `PREFIXES`."""

    def __init__(self, logdir: str | Path) -> None:
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.latest: dict[str, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            if not tag.startswith(PREFIXES):
                raise ValueError(f"metric '{tag}' has no known prefix; use one of {PREFIXES}")
            value = float(value)
            self.writer.add_scalar(tag, value if math.isfinite(value) else float("nan"), step)
            self.latest[tag] = value

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
