"""The classical baseline: PID speed control plus pure-pursuit steering.

It acts on the learned policy's own observation (speed and look-ahead route points decoded from
the vector features; it ignores the camera and therefore traffic), goes through the same env
contract, and is scored by the same evaluator, so its eval/* metrics compare one to one with the
learner's: `python -m learner.evaluate --policy baseline --config deploy/configs/default.yaml`.
"""

from __future__ import annotations

import math

import numpy as np

from actors.envs import backend_spec
from common.config import Config, EnvConfig
from common.driving import SPEED_NORM, decode_lookahead

KP, KI, KD = 0.5, 0.3, 0.13
INTEGRAL_LIMIT = 1.0 / KI
"""The integrator is clamped so its term alone never exceeds full throttle or brake (anti-windup)."""
WHEELBASE_M = 3.0
MIN_LOOKAHEAD_M = 6.0
LOOKAHEAD_GAIN_S = 0.8


class PurePursuitPID:
    """A policy: observation -> [steer, throttle_brake]. `reset()` clears the PID state."""

    def __init__(self, target_speed: float, dt: float, max_steer_rad: float, env_cfg: EnvConfig | None = None) -> None:
        """`env_cfg` says how the vector encodes the look-ahead (the default config when None)."""
        self.env_cfg = env_cfg or EnvConfig()
        self.target_speed = target_speed
        self.dt = dt
        self.max_steer_rad = max_steer_rad
        self.reset()

    def reset(self) -> None:
        self.integral = 0.0
        self.prev_error: float | None = None

    def throttle_brake(self, speed: float) -> float:
        error = self.target_speed - speed
        self.integral = float(np.clip(self.integral + error * self.dt, -INTEGRAL_LIMIT, INTEGRAL_LIMIT))
        derivative = 0.0 if self.prev_error is None else (error - self.prev_error) / self.dt
        self.prev_error = error
        return float(np.clip(KP * error + KI * self.integral + KD * derivative, -1.0, 1.0))

    def steer(self, speed: float, lookahead: np.ndarray) -> float:
        """Pure pursuit toward the first route point at least max(6, 0.8 v) m away (ego frame,
        y left); positive steer turns right, so the sign flips."""
        reach = max(MIN_LOOKAHEAD_M, LOOKAHEAD_GAIN_S * speed)
        dist = np.hypot(lookahead[:, 0], lookahead[:, 1])
        x, y = lookahead[int(np.argmax(dist >= reach)) if (dist >= reach).any() else -1]
        ld2 = max(x * x + y * y, 1e-6)
        wheel_angle = math.atan(2.0 * WHEELBASE_M * y / ld2)
        return float(np.clip(-wheel_angle / self.max_steer_rad, -1.0, 1.0))

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        vector = observation["vector"]
        speed = float(vector[0]) * SPEED_NORM
        lookahead = decode_lookahead(vector, self.env_cfg)
        return np.array([self.steer(speed, lookahead), self.throttle_brake(speed)], dtype=np.float32)


def baseline_for(cfg: Config, dt: float) -> PurePursuitPID:
    return PurePursuitPID(cfg.env.reward.target_speed, dt, backend_spec(cfg).max_steer_rad, cfg.env)

