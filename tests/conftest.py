from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

from common.config import Config, load_config  # noqa: E402


@pytest.fixture
def small_cfg() -> Config:
    """A config that trains in seconds on CPU: short episodes, small batches."""
    return load_config(
        overrides=[
            "td3.batch_size=16",
            "td3.learning_starts=100",
            "replay.capacity=2000",
            "env.max_episode_steps=60",
            "eval.num_episodes=1",
            "eval.freq=0",
            "learner.device=cpu",
            "learner.updates_per_step=0.5",
            "logging.log_interval=10",
        ]
    )


def random_batch_arrays(b: int, seed: int = 0, reward_scale: float = 1.0) -> dict[str, np.ndarray]:
    """A batch of random transitions in the replay's layout; the second one is terminal."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (b, 4, 84, 84), dtype=np.uint8),
        "next_image": rng.integers(0, 256, (b, 4, 84, 84), dtype=np.uint8),
        "vector": rng.normal(size=(b, 53)).astype(np.float32),
        "next_vector": rng.normal(size=(b, 53)).astype(np.float32),
        "action": rng.uniform(-1, 1, (b, 2)).astype(np.float32),
        "reward": (rng.normal(size=b) * reward_scale).astype(np.float32),
        "done": (np.arange(b) == 1).astype(np.float32),
        "discount": (0.99 ** rng.integers(1, 4, b)).astype(np.float32),  # 1- to 3-step returns
    }
