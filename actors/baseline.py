"""The classical baseline: PID speed control plus pure-pursuit steering, and the privileged
rule-based driver built on it.

`PurePursuitPID` acts on the learned policy's own observation (speed and look-ahead route points
decoded from the vector features; it ignores the camera and therefore traffic). `PrivilegedDriver`
adds what a rule-based driver with the simulator's truth does (as CaRL's PDM-Lite does): IDM car
following and a gap-accepting lane change on the true positions and speeds of the other vehicles
(`DrivingBackend.surroundings`). Both go through the same env contract and are scored by the same
evaluator, so their eval/* metrics compare one to one with the learner's:
`python -m learner.evaluate --policy baseline --config deploy/configs/default.yaml`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from actors.envs import backend_spec
from common.config import Config, EnvConfig
from common.driving import LATERAL_NORM, SPEED_NORM, Surroundings, decode_lookahead

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


# IDM (Treiber et al., 2000) and the lane change, tuned on scenario 1 and 2 training seeds (results/scenarios.md).
IDM_ACCEL, IDM_DECEL, IDM_GAP_M, IDM_HEADWAY_S = 2.0, 3.0, 5.0, 1.2
"""Maximum acceleration and comfortable deceleration (m/s^2), standstill gap (m), time headway (s)."""
CAR_LENGTH_M = 5.0
"""Centre-to-centre distance at which two cars in one lane touch (highway-env's and a Model 3's ~4.7 m)."""
OVERLAP_M = 3.2
"""Lateral distance between centres below which another car is in the ego's path (two ~2 m wide cars, plus a margin for the steering lagging the planned path)."""
CUT_IN_S = 1.5
"""A car ahead whose lateral speed brings it within OVERLAP_M of the ego's path within this long is followed."""
SPEED_HORIZON_S = 1.0
"""The PID tracks the speed IDM's acceleration reaches after this long."""
FULL_BRAKE_MS2 = 5.0
"""Deceleration at throttle_brake = -1 (highway-env's ACCELERATION_RANGE), for IDM's harder brakings."""
CHANGE_GAIN_MS2 = 0.3
"""IDM acceleration the other lane must offer over the current one before the driver changes to it."""
RETURN_TOLERANCE_MS2 = 0.05
"""The route's lane is taken back when its IDM acceleration is within this of the current lane's."""
CHANGE_SLOPE = 0.5
"""Lateral metres per metre driven that the driver plans while changing lanes."""
BACK_GAP_S, FRONT_GAP_S, MIN_SIDE_GAP_M = 2.0, 1.0, 4.0
"""Gap acceptance: the follower in the target lane needs MIN_SIDE_GAP_M plus BACK_GAP_S times its
closing speed behind the ego; the leader MIN_SIDE_GAP_M plus FRONT_GAP_S times the ego's closing speed."""


def idm_acceleration(speed: float, target_speed: float, gap: float, lead_speed: float) -> float:
    """IDM's acceleration at `speed` with `gap` metres (bumper to bumper; inf: free road) to a
    leader at `lead_speed`."""
    free = 1.0 - (max(speed, 0.0) / target_speed) ** 4
    if not math.isfinite(gap):
        return IDM_ACCEL * free
    wanted = IDM_GAP_M + max(speed, 0.0) * IDM_HEADWAY_S + speed * (speed - lead_speed) / (2 * math.sqrt(IDM_ACCEL * IDM_DECEL))
    return IDM_ACCEL * (free - (max(wanted, 0.0) / max(gap, 0.1)) ** 2)


class PrivilegedDriver:
    """IDM car following and gap-accepting lane changes on the simulator's truth, steered and
    speed-controlled by a `PurePursuitPID`: it keeps to the route's lane, changes to another lane
    of the road when that lane's leader lets it go faster by CHANGE_GAIN_MS2 and both gaps there
    are accepted, and returns to the route's lane as soon as that is as fast and its gaps accepted.
    Where the route is one lane (`env.lane_change` off) it only follows."""

    def __init__(self, pid: PurePursuitPID, surroundings: Callable[[], Surroundings]) -> None:
        self.pid = pid
        self.surroundings = surroundings
        self.target_speed = pid.target_speed
        self.reset()

    def reset(self) -> None:
        self.pid.reset()
        self.lane = 0.0  # lateral offset of the lane the driver wants to be in

    def _leader(self, vehicles: np.ndarray, path: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        """(bumper gap, speed) of the nearest vehicle ahead whose centre is within OVERLAP_M of
        `path` (the ego's lateral offset at each vehicle's distance ahead)."""
        ahead = vehicles[vehicles[:, 0] > 0.0]
        # A car moving sideways into the path within CUT_IN_S counts already (a cut-in).
        apart = ahead[:, 1] - path(ahead[:, 0])
        coming = np.clip(-np.sign(apart) * ahead[:, 3], 0.0, None) * CUT_IN_S
        ahead = ahead[np.abs(apart) - coming < OVERLAP_M]
        if len(ahead) == 0:
            return math.inf, self.target_speed
        k = int(np.argmin(ahead[:, 0]))
        return float(ahead[k, 0]) - CAR_LENGTH_M, float(ahead[k, 2])

    def _lane_accel(self, vehicles: np.ndarray, lane: float, speed: float) -> float:
        gap, lead_speed = self._leader(vehicles, lambda x: np.full_like(x, lane))
        return idm_acceleration(speed, self.target_speed, gap, lead_speed)

    def _gaps_accepted(self, vehicles: np.ndarray, lane: float, speed: float) -> bool:
        there = vehicles[np.abs(vehicles[:, 1] - lane) < OVERLAP_M]
        for ahead, _, other_speed, _ in there:
            gap = abs(ahead) - CAR_LENGTH_M
            closing = other_speed - speed if ahead < 0 else speed - other_speed
            needed = MIN_SIDE_GAP_M + max(closing, 0.0) * (BACK_GAP_S if ahead < 0 else FRONT_GAP_S)
            if gap < needed:
                return False
        return True

    def _choose_lane(self, su: Surroundings, lateral: float, speed: float) -> None:
        if not self.pid.env_cfg.lane_change:
            return
        if abs(lateral - self.lane) > su.lane_width / 2:
            return  # a change in progress is finished first
        route = float(su.lanes[np.argmin(np.abs(su.lanes))])
        here = self._lane_accel(su.vehicles, self.lane, speed)
        if self.lane != route:
            if self._lane_accel(su.vehicles, route, speed) >= here - RETURN_TOLERANCE_MS2 and self._gaps_accepted(su.vehicles, route, speed):
                self.lane = route
            return
        for lane in su.lanes:
            if lane != self.lane and self._lane_accel(su.vehicles, lane, speed) > here + CHANGE_GAIN_MS2 \
                    and self._gaps_accepted(su.vehicles, lane, speed):
                self.lane = float(lane)
                return

    def __call__(self, observation: dict[str, np.ndarray]) -> np.ndarray:
        vector = observation["vector"]
        speed, lateral = float(vector[0]) * SPEED_NORM, float(vector[1]) * LATERAL_NORM
        su = self.surroundings()
        self._choose_lane(su, lateral, speed)

        def path(x: np.ndarray) -> np.ndarray:
            """The lateral offset the driver plans at x metres ahead: from where it is to its lane,
            CHANGE_SLOPE metres sideways per metre; the car it follows and the steering both use it."""
            return lateral + np.clip(CHANGE_SLOPE * x, 0.0, abs(self.lane - lateral)) * np.sign(self.lane - lateral)

        gap, lead_speed = self._leader(su.vehicles, path)
        accel = idm_acceleration(speed, self.target_speed, gap, lead_speed)
        self.pid.target_speed = float(np.clip(speed + accel * SPEED_HORIZON_S, 0.0, self.target_speed))
        throttle = self.pid.throttle_brake(speed)
        if accel < 0.0:
            throttle = max(min(throttle, accel / FULL_BRAKE_MS2), -1.0)
        route = decode_lookahead(vector, self.pid.env_cfg)
        ahead = np.cumsum(np.linalg.norm(np.diff(route, axis=0, prepend=np.zeros((1, 2))), axis=1))
        return np.array([self.pid.steer(speed, shift_lookahead(route, path(ahead))), throttle], dtype=np.float32)


def shift_lookahead(points: np.ndarray, offset: float | np.ndarray) -> np.ndarray:
    """Route points (ego frame) moved `offset` metres (one for all, or one per point) to the left of the route."""
    # Central differences: where two racetrack segments overlap, a point can lie a little behind
    # the one before it, and that one step's direction would flip the normal.
    d = np.gradient(points, axis=0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    return points + np.reshape(offset, (-1, 1)) * np.stack([-d[:, 1], d[:, 0]], axis=1)


def baseline_for(cfg: Config, dt: float, surroundings: Callable[[], Surroundings] | None = None) -> PurePursuitPID | PrivilegedDriver:
    """The traffic-blind PID + pure pursuit, or with `surroundings` (a backend's) the privileged driver on it."""
    pid = PurePursuitPID(cfg.env.reward.target_speed, dt, backend_spec(cfg).max_steer_rad, cfg.env)
    return pid if surroundings is None else PrivilegedDriver(pid, surroundings)
