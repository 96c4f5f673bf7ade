"""Cuts an actor's episode into self-contained chunks (see `common.chunk` for the frame arithmetic)."""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np

from common.chunk import Chunk
from common.driving import FRAME_STACK


class ChunkAdder:
    """Collects steps of the current episode and hands a `Chunk` to `sink` every `chunk_steps`
    steps and when the episode ends.

    Episode ids start at a random 62-bit base, so an actor restarted after a crash never reuses
    an id whose chunks are still in the replay (which would make its new chunks look like resends).
    """

    def __init__(self, actor_id: int, chunk_steps: int, sink: Callable[[Chunk], None]) -> None:
        self.actor_id = actor_id
        self.chunk_steps = chunk_steps
        self.sink = sink
        self._next_episode = secrets.randbits(62)
        self.episode_id = -1
        self.policy_version = 0
        self._start = 0  # k0 of the chunk being built
        self._frames: list[np.ndarray] = []  # f_a .. f_current
        self._vectors: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []
        self._terminated: list[bool] = []
        self._truncated: list[bool] = []
        self._driver: list[bool] = []
        self._teacher: list[np.ndarray | None] = []

    def reset(self, observation: dict[str, np.ndarray]) -> None:
        self.flush()
        self.episode_id = self._next_episode
        self._next_episode += 1
        self._start = 0
        self._frames = [observation["image"][-1].copy()]
        self._vectors = [observation["vector"].copy()]

    def add(self, action: np.ndarray, reward: float, next_observation: dict[str, np.ndarray],
            terminated: bool, truncated: bool, policy_version: int = 0, driver: bool = False,
            teacher: np.ndarray | None = None) -> None:
        """`driver`: the action came from a driver (warm-up or guided episode), not the policy;
        `teacher`: the privileged driver's action for this step's observation, if labelled."""
        self.policy_version = policy_version
        self._frames.append(next_observation["image"][-1].copy())
        self._vectors.append(next_observation["vector"].copy())
        self._actions.append(np.asarray(action, np.float32))
        self._rewards.append(float(reward))
        self._terminated.append(bool(terminated))
        self._truncated.append(bool(truncated))
        self._driver.append(bool(driver))
        self._teacher.append(None if teacher is None else np.asarray(teacher, np.float32))
        if len(self._actions) >= self.chunk_steps or terminated or truncated:
            self.flush()

    def flush(self) -> None:
        """Emits the steps collected so far, keeping what the next chunk of the episode needs."""
        t = len(self._actions)
        if t == 0:
            return
        self.sink(Chunk(
            actor_id=self.actor_id,
            episode_id=self.episode_id,
            start_step=self._start,
            policy_version=self.policy_version,
            frames=np.stack(self._frames),
            vectors=np.stack(self._vectors),
            actions=np.stack(self._actions),
            rewards=np.asarray(self._rewards, np.float32),
            terminated=np.asarray(self._terminated),
            truncated=np.asarray(self._truncated),
            driver=np.asarray(self._driver),
            teacher=None if any(a is None for a in self._teacher) else np.stack(self._teacher),
        ))
        self._start += t
        # The next chunk starts at k0' = k0 + T and needs f_{k0'-3} .. f_{k0'}.
        self._frames = self._frames[-(min(self._start, FRAME_STACK - 1) + 1):]
        self._vectors = self._vectors[-1:]
        self._actions, self._rewards, self._terminated, self._truncated, self._driver, self._teacher = [], [], [], [], [], []
