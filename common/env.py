"""The one environment contract, shared by the embedded simulator and CARLA.

A backend only ticks a simulator and reports a camera frame plus a `DrivingState`; `DrivingEnv`
turns that into the gymnasium env every role uses:

- observation: {"image": uint8 (4, 84, 84) grayscale frames, oldest first,
                "vector": float32 (vector_dim(cfg),): 53, more with env.gap_features
                and env.traffic_features}; at reset the stack is the first frame repeated;
- action: float32 [steer, throttle_brake] in [-1, 1]^2 (positive steer turns right, as in
  CARLA; positive throttle_brake accelerates, negative brakes);
- info: "termination" (one of `TERMINATIONS`, or None while the episode runs), "rewards"
  (the five weighted components; the reward is their sum), "lane_invasion", "collision", "speed", "progress",
  "obstacle_distance", "aeb" (emergency braking, `EnvConfig.aeb_gap_m`, took the throttle this
  step), and on a collision "collision_kind" (one of `COLLISION_KINDS`, from the backend's
  `surroundings()` at that step).
"""

from __future__ import annotations

from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from common.config import EnvConfig
from common.driving import (
    ACTION_DIM,
    FRAME_SIZE,
    FRAME_STACK,
    DrivingState,
    Surroundings,
    closing_speed,
    collision_kind,
    emergency_brake,
    reward_components,
    stopped_time,
    termination,
    vector_dim,
    vector_features,
    weighted_components,
)


class SimulatorFailure(RuntimeError):
    """The simulator hung or died mid-episode: the episode in flight is lost, and the next
    `reset()` recovers (relaunches) the simulator and starts a new one."""


class DrivingBackend(Protocol):
    """A simulator seen through the driving state."""

    dt: float
    """Simulated seconds per step."""

    def reset(self, seed: int | None) -> tuple[np.ndarray, DrivingState]:
        """Starts an episode; returns the first (84, 84) uint8 frame and the state."""

    def step(self, action: np.ndarray) -> tuple[np.ndarray, DrivingState]:
        """Applies [steer, throttle_brake] for one step; returns the new frame and state."""

    def surroundings(self) -> Surroundings:
        """The other vehicles and the road's lanes, true positions (for the privileged baseline and
        `EnvConfig.traffic_features`)."""

    def render_rgb(self) -> np.ndarray:
        """A larger (H, W, 3) uint8 picture of the scene, for videos a person watches."""

    def metrics(self) -> dict[str, float]:
        """Backend health since the last call, logged under actors/ (empty for the embedded one)."""

    def close(self) -> None:
        """Releases the simulator."""


def observation_space(cfg: EnvConfig) -> gym.spaces.Dict:
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, (FRAME_STACK, FRAME_SIZE, FRAME_SIZE), np.uint8),
            "vector": gym.spaces.Box(-np.inf, np.inf, (vector_dim(cfg),), np.float32),
        }
    )


class DrivingEnv(gym.Env):
    """Frame stacking, vector features, reward and termination over any `DrivingBackend`."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, backend: DrivingBackend, cfg: EnvConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self.observation_space = observation_space(cfg)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._frames = np.zeros((FRAME_STACK, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._state: DrivingState | None = None
        self._steps = 0
        self._stopped_s = 0.0
        self._brake = False

    def _observation(self, state: DrivingState, closing: float = 0.0) -> dict[str, np.ndarray]:
        around = self.backend.surroundings() if self.cfg.traffic_features else None
        return {"image": self._frames.copy(), "vector": vector_features(state, self.cfg, closing, around)}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        frame, state = self.backend.reset(seed)
        self._frames[:] = frame
        self._state = state
        self._steps = 0
        self._stopped_s = 0.0
        self._brake = emergency_brake(state, None, self.backend.dt, self.cfg)
        return self._observation(state), {"termination": None, "speed": state.speed, "progress": state.progress}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self._state is None:
            raise RuntimeError("DrivingEnv.step() called before reset()")
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers [steer, throttle_brake], got {action!r}")
        action = np.clip(action, -1.0, 1.0)
        braked = self._brake
        if braked:
            action = np.array([action[0], -1.0], dtype=np.float32)
        frame, state = self.backend.step(action)
        self._steps += 1
        self._frames = np.roll(self._frames, -1, axis=0)
        self._frames[-1] = frame
        self._stopped_s = stopped_time(state, self._stopped_s, self.backend.dt, self.cfg)
        terminated, truncated, reason = termination(state, self._steps, self.cfg, self._stopped_s)
        components = weighted_components(
            reward_components(state, self._state, self.backend.dt, reason, self.cfg, braked), self.cfg.reward
        )
        reward = float(sum(components.values()))
        closing = closing_speed(state, self._state, self.backend.dt)
        self._brake = emergency_brake(state, self._state, self.backend.dt, self.cfg)
        self._state = state
        info = {
            "termination": reason,
            "rewards": components,
            "lane_invasion": bool(state.lane_invasion),
            "collision": bool(state.collision),
            "speed": state.speed,
            "progress": state.progress,
            "progress_pct": 100.0 * state.progress / self.cfg.route_length_m,
            "obstacle_distance": state.obstacle_distance,
            "aeb": braked,
        }
        if state.collision:
            info["collision_kind"] = collision_kind(state.lateral_offset, self.backend.surroundings())
        return self._observation(state, closing), reward, terminated, truncated, info

    def render(self) -> np.ndarray:
        return self.backend.render_rgb()

    def close(self) -> None:
        self.backend.close()
