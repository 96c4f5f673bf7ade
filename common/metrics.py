"""The one logger: it owns the metric prefixes, and env steps are the shared x-axis."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from common.driving import ACTION_NAMES, REWARD_COMPONENTS

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

    def video(self, tag: str, gif: bytes, size: tuple[int, int], step: int) -> None:
        """An animated GIF (see `encode_gif`) in TensorBoard's image tab."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if not tag.startswith(PREFIXES):
            raise ValueError(f"metric '{tag}' has no known prefix; use one of {PREFIXES}")
        image = Summary.Image(height=size[0], width=size[1], colorspace=3, encoded_image_string=gif)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        if not tag.startswith(PREFIXES):
            raise ValueError(f"metric '{tag}' has no known prefix; use one of {PREFIXES}")
        self.writer.add_histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
        for k, v in info["rewards"].items():
            self.components[k] += v

    def metrics(self) -> dict[str, float]:
        return {
            "train/episode_reward": self.reward,
            "train/episode_length": self.length,
            "train/collisions_per_episode": self.collisions,
            "train/lane_invasions_per_episode": self.lane_invasions,
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
