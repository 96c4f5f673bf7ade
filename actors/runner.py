"""The acting loop shared by serial mode and every rollout actor: one env driven by an `Actor`,
feeding a `ChunkAdder`, one step at a time; a rollout actor steps several such runners together
with one batched policy forward (`VectorRunner`)."""

from __future__ import annotations

import logging
import time

import numpy as np

from actors.actor import Actor, finite_step
from actors.adder import ChunkAdder
from common.env import DrivingEnv, SimulatorFailure
from common.metrics import EpisodeStats

log = logging.getLogger(__name__)


class EpisodeRunner:
    """Episode `k` resets with seed `seed + k`. A step whose observation or reward is not finite
    is dropped before the replay, counted, logged, and restarts the episode. A simulator failure
    (hang or crash) ends the episode in flight: the steps it already made are sent as they are
    (each is a whole transition), and the next reset recovers the simulator."""

    def __init__(self, env: DrivingEnv, actor: Actor, adder: ChunkAdder, seed: int, first_episode: int = 0) -> None:
        self.env = env
        self.actor = actor
        self.adder = adder
        self.seed = seed
        self.episodes = first_episode
        self.nonfinite = 0
        self.simulator_failures = 0
        self.stats = EpisodeStats()
        self.obs = self._reset()

    def _reset(self) -> dict[str, np.ndarray]:
        obs, _ = self.env.reset(seed=self.seed + self.episodes)
        self.adder.reset(obs)
        self.actor.on_episode_start()
        return obs

    def step(self, env_step: int, policy_version: int = 0, policy_action: np.ndarray | None = None) -> dict[str, float] | None:
        """One env step; returns the finished episode's train/* and rewards/* metrics, if one ended.
        `policy_action`: the policy's action for the current observation, if already computed."""
        action = self.actor.select_action(self.obs, env_step, policy_action)
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except SimulatorFailure as exc:
            self.simulator_failures += 1
            log.warning("actor %d lost episode %d at env step %d to a simulator failure: %s",
                        self.adder.actor_id, self.episodes, env_step, exc)
            self.stats = EpisodeStats()
            self.obs = self._reset()
            return None
        if not finite_step(obs, reward):
            self.nonfinite += 1
            log.warning("actor %d dropped a non-finite step at env step %d (episode %d); episode restarted",
                        self.adder.actor_id, env_step, self.episodes)
            self.stats = EpisodeStats()
            self.obs = self._reset()
            return None
        self.adder.add(action, reward, obs, terminated, truncated, policy_version, self.actor.driver_acted,
                       self.actor.last_teacher_action)
        self.stats.add(reward, info, self.actor.last_policy_action)
        self.obs = obs
        if not (terminated or truncated):
            return None
        finished = self.stats.metrics()
        self.stats = EpisodeStats()
        self.episodes += 1
        self.obs = self._reset()
        return finished


class VectorRunner:
    """K `EpisodeRunner`s stepped together, with one batched policy forward per step over all of
    them (every env auto-resets, so all K are always running). Each runner keeps its own env,
    `Actor` (exploration noise and its random generator), adder, episodes, seeds and stats, so the
    transitions are those of K separate actors; only the forward pass is shared."""

    def __init__(self, runners: list[EpisodeRunner]) -> None:
        if not runners:
            raise ValueError("a VectorRunner needs at least one EpisodeRunner")
        self.runners = runners
        self.inference_seconds = 0.0
        """Wall time spent in the batched policy forward (stacking and conversions included)."""

    def step(self, env_step: int, policy_version: int = 0) -> list[dict[str, float]]:
        """One step of every env; the metrics of the episodes that ended."""
        lead = self.runners[0].actor
        actions: list[np.ndarray | None] = [None] * len(self.runners)
        if lead.acts_on_policy(env_step):
            start = time.perf_counter()
            actions = list(lead.policy_actions([r.obs for r in self.runners]))
            self.inference_seconds += time.perf_counter() - start
        finished = (r.step(env_step, policy_version, a) for r, a in zip(self.runners, actions))
        return [episode for episode in finished if episode is not None]

    @property
    def nonfinite(self) -> int:
        return sum(r.nonfinite for r in self.runners)

    @property
    def simulator_failures(self) -> int:
        return sum(r.simulator_failures for r in self.runners)
