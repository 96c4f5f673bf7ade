"""The one logger: it owns the metric prefixes, and env steps are the shared x-axis."""

from __future__ import annotations

import io
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from common.driving import ACTION_NAMES, REWARD_COMPONENTS, TERMINATIONS
from common.tags import describe, layout

log = logging.getLogger(__name__)

PREFIXES = (
    "train/", "eval/", "debug/", "perf/", "replay/", "actors/", "alerts/", "gradients/", "agent/", "rewards/",
)


def _check_prefix(tag: str) -> None:
    if not tag.startswith(PREFIXES):
        raise ValueError(f"metric '{tag}' has no known prefix; use one of {PREFIXES}")


class MetricLogger:
    """Scalars, histograms, videos and text to TensorBoard under `logdir`; rejects tags outside
    `PREFIXES`. The first value of each scalar carries its description from `common.tags`
    (TensorBoard shows it on hover); a tag without one is logged anyway, warned about once and
    kept in `undescribed` (the tests require it empty). The run opens on the overview layout."""

    def __init__(self, logdir: str | Path) -> None:
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.latest: dict[str, float] = {}
        self.undescribed: set[str] = set()
        self._described: set[str] = set()
        self.writer.add_custom_scalars(layout())

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            _check_prefix(tag)
            value = float(value)
            self._scalar(tag, value if math.isfinite(value) else float("nan"), step)
            self.latest[tag] = value

    def _scalar(self, tag: str, value: float, step: int) -> None:
        # Tensor-style scalars: TensorBoard keeps each tag's first metadata, which carries the
        # description; read them back with `read_scalars`.
        if tag in self._described:
            self.writer.add_scalar(tag, value, step, new_style=True)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto

        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"),
                                   summary_description=self._description(tag))
        tensor = TensorProto(float_val=[value], dtype="DT_FLOAT")
        summary = Summary(value=[Summary.Value(tag=tag, tensor=tensor, metadata=metadata)])
        self.writer._get_file_writer().add_summary(summary, step)
        self._described.add(tag)

    def _description(self, tag: str) -> str:
        text = describe(tag)
        if text is None:
            if tag not in self.undescribed:
                log.warning("metric '%s' has no description in common/tags.py", tag)
            self.undescribed.add(tag)
            return ""
        return text

    def video(self, tag: str, gif: bytes, size: tuple[int, int], step: int) -> None:
        """An animated GIF (see `encode_gif`) in TensorBoard's image tab."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        _check_prefix(tag)
        self._description(tag)
        image = Summary.Image(height=size[0], width=size[1], colorspace=3, encoded_image_string=gif)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        _check_prefix(tag)
        self._description(tag)
        self.writer.add_histogram(tag, values, step)

    def hparams(self, values: dict[str, bool | int | float | str], metrics: tuple[str, ...]) -> None:
        """The HPARAMS tab: this run's hyperparameters, with `metrics` (tags this run logs) as columns.
        Written into the run's own folder, so runs and seeds compare side by side."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
            self.writer._get_file_writer().add_summary(summary)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every scalar of a run as tag -> [(wall time, step, value)], whether written tensor-style
    (this logger) or as plain values (older runs, other writers)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(run_dir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return {
        tag: [(e.wall_time, e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }


def encode_gif(frames: list[Any], fps: int = 10) -> bytes:
    """(H, W, 3) uint8 frames -> animated GIF bytes (TensorBoard's add_video needs moviepy)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buffer.getvalue()


@dataclass
class EpisodeStats:
    """Sums over one training episode, reported as train/* and rewards/* metrics."""

    reward: float = 0.0
    length: int = 0
    collisions: int = 0
    lane_invasions: int = 0
    braked: int = 0
    speed_sum: float = 0.0
    progress: float = 0.0
    progress_pct: float = 0.0
    termination: str | None = None
    components: dict[str, float] = field(default_factory=lambda: dict.fromkeys(REWARD_COMPONENTS, 0.0))
    policy_actions: list[np.ndarray] = field(default_factory=list)

    def add(self, reward: float, info: dict[str, Any], policy_action: np.ndarray | None = None) -> None:
        """One step; `policy_action` is the policy's action before exploration noise, if it acted."""
        if policy_action is not None:
            self.policy_actions.append(policy_action)
        self.reward += reward
        self.length += 1
        self.collisions += int(info["collision"])
        self.lane_invasions += int(info["lane_invasion"])
        self.braked += int(info["aeb"])
        self.speed_sum += info["speed"]
        self.progress, self.progress_pct = info["progress"], info["progress_pct"]
        self.termination = info["termination"]
        for k, v in info["rewards"].items():
            self.components[k] += v

    def metrics(self) -> dict[str, float]:
        return {
            "train/episode_reward": self.reward,
            "train/episode_length": self.length,
            "train/collisions_per_episode": self.collisions,
            "train/lane_invasions_per_episode": self.lane_invasions,
            "train/aeb_steps": self.braked / max(self.length, 1),
            "train/mean_speed": self.speed_sum / max(self.length, 1),
            "train/route_progress_m": self.progress,
            "train/route_progress_pct": self.progress_pct,
            # This episode's indicator; `TerminationWindow` turns it into a fraction over recent episodes.
            **{f"train/termination_{r}": float(r == self.termination) for r in TERMINATIONS},
            **{f"rewards/{k}": v for k, v in self.components.items()},
            **self._policy_action_metrics(),
        }

    def _policy_action_metrics(self) -> dict[str, float]:
        """Per-dimension mean and std of the policy's actions before noise (absent while acting randomly)."""
        if not self.policy_actions:
            return {}
        actions = np.stack(self.policy_actions)
        out = {}
        for i, name in enumerate(ACTION_NAMES):
            out[f"train/policy_action_mean_{name}"] = float(actions[:, i].mean())
            out[f"train/policy_action_std_{name}"] = float(actions[:, i].std())
        return out


class TerminationWindow:
    """Replaces an episode's train/termination_* indicators by their mean over the last `size`
    finished episodes (from every actor): the fraction of recent episodes that ended each way."""

    def __init__(self, size: int) -> None:
        self.recent: deque[dict[str, float]] = deque(maxlen=size)

    def apply(self, episode: dict[str, float]) -> dict[str, float]:
        keys = [f"train/termination_{r}" for r in TERMINATIONS]
        self.recent.append({k: episode[k] for k in keys})
        return episode | {k: float(np.mean([e[k] for e in self.recent])) for k in keys}
