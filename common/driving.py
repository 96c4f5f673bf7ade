"""The driving state every backend fills, and the shared code that turns it into features,
reward and termination. CARLA and the embedded simulator both go through here, so the two
cannot drift apart.

Conventions: metres, seconds, radians. The ego frame has x forward and y to the left of the
vehicle; a positive lateral offset means the vehicle is left of the route centre; a positive
heading error means the vehicle points left of the route direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from common.config import EnvConfig, RewardConfig

FRAME_SIZE = 84
FRAME_STACK = 4
LOOKAHEAD_POINTS = 25
VECTOR_DIM = 3 + 2 * LOOKAHEAD_POINTS  # speed, lateral offset, heading error, look-ahead (x, y)
GAP_FEATURES = 2  # gap to the vehicle ahead and how fast it closes, with `EnvConfig.gap_features`
TRAFFIC_FEATURES = 5  # per vehicle of `EnvConfig.traffic_features`: present, ahead, beside, relative speed, lateral speed
ACTION_DIM = 2  # [steer, throttle_brake], both in [-1, 1]; throttle_brake > 0 accelerates
ACTION_NAMES = ("steer", "throttle")  # metric suffixes of the two action dimensions

CARLA_FPS = 20
"""Ticks per simulated second of the CARLA backend (synchronous mode, fixed delta 0.05 s)."""
ROUTE_TIME_MARGIN = 1.25
"""Episode time over the time the route takes at the target speed below which success is out of reach."""

SPEED_NORM = 30.0
LATERAL_NORM = 3.5
LOOKAHEAD_NORM = 50.0

TERMINATIONS = ("collision", "off_road", "lane_departure", "route_completed", "stuck", "timeout")
EVAL_ONLY_TERMINATIONS = ("off_road", "lane_departure", "stuck", "timeout")
"""Reasons with an eval/termination_* tag; the other two are eval/collision_rate and eval/success_rate."""
REWARD_COMPONENTS = ("efficiency", "lane_keeping", "comfort", "safety", "progress")
COLLISION_KINDS = ("rear_end", "from_behind", "side", "other")
"""What a collision hit (`collision_kind`): the vehicle ahead in the ego's lane, one behind in it, one
beside it (a lane change or a cut-in), or no vehicle near (a wall, a pole, a pedestrian on CARLA)."""
COLLISION_REACH_M = 10.0
"""The nearest vehicle further than this from the ego at a collision is not what it hit."""
AEB_MIN_SPEED_MS = 0.5
"""Speed, m/s, below which emergency braking (`emergency_brake`) leaves the throttle to the policy:
it brakes a moving car and lets a stopped one move off, as production systems release a held car
to its driver. Holding it would hold for good a car stopped short of its margin, unable to pull
out round the car ahead."""
OBSTACLE_RANGE_M = 20.0
"""How far ahead `DrivingState.obstacle_distance` looks (CARLA's obstacle sensor's `distance`)."""
TRAFFIC_RANGE_M = 40.0
"""Metres ahead or behind along the route within which `traffic_features` lists a vehicle (and the
scale of its distance)."""


@dataclass
class DrivingState:
    """What a backend measures after each tick."""

    speed: float
    """Forward speed, m/s."""
    lateral_offset: float
    """Signed distance from the route centre, m (positive = left)."""
    heading_error: float
    """Vehicle heading minus route heading, wrapped to [-pi, pi] (positive = pointing left)."""
    acceleration: float
    """Longitudinal acceleration, m/s^2."""
    collision: bool
    """A collision happened during the last tick."""
    off_road: bool
    """The vehicle is outside the drivable road."""
    lane_invasion: bool
    """A lane marking was crossed during the last tick (an event, not a state)."""
    progress: float
    """Metres driven along the route since the episode started."""
    obstacle_distance: float = math.inf
    """Gap, m, from the ego's front bumper to the nearest vehicle ahead in its path, within
    OBSTACLE_RANGE_M (inf when none); reported in info, scored by the headway penalty and, with
    `EnvConfig.gap_features`, two vector features (`vector_features`). The embedded simulator
    measures it bumper to bumper along the route, CARLA's obstacle sensor from its mount to the
    other's surface, corrected to the bumper."""
    lookahead: np.ndarray = field(default_factory=lambda: np.zeros((LOOKAHEAD_POINTS, 2), np.float32))
    """(25, 2) route centre points ahead, in the ego frame (x forward, y left), m."""
    lane_offset: float | None = None
    """Signed distance, m, from the centre of the lane the car is in, a lane that goes the route's
    way (positive left): what lane keeping scores with `RewardConfig.lane_keeping_reference` 'lane'.
    None off every such lane; the route's offset stands in."""


@dataclass
class Surroundings:
    """The simulator's truth about the traffic around the ego, for rule-based drivers (the
    privileged baseline), part of an observation only through `EnvConfig.traffic_features`. Route coordinates: metres along the route
    (positive ahead of the ego) and lateral offset from the route centre (positive left)."""

    lanes: np.ndarray
    """(L,) lateral offsets, m, of the centres of the road's lanes that go the route's way, at the ego."""
    lane_width: float
    """Width of the ego's lane, m."""
    vehicles: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    """(N, 4) per other vehicle: metres ahead of the ego along the route (negative behind), lateral
    offset from the route centre, m, speed, m/s, and lateral speed, m/s (positive left)."""


def wrap_angle(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def to_ego_frame(points: np.ndarray, position: np.ndarray, heading: float) -> np.ndarray:
    """World points (N, 2) into the ego frame of a vehicle at `position` facing `heading`."""
    c, s = math.cos(heading), math.sin(heading)
    d = np.asarray(points, dtype=np.float64) - np.asarray(position, dtype=np.float64)
    return np.stack([d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c], axis=1)


def lookahead_scale(cfg: EnvConfig) -> np.ndarray:
    """(25, 1) metres per unit of each look-ahead point's features (`EnvConfig.lookahead_features`)."""
    if cfg.lookahead_features == "per_point":
        return (cfg.lookahead_spacing_m * np.arange(1, LOOKAHEAD_POINTS + 1, dtype=np.float32))[:, None]
    return np.full((LOOKAHEAD_POINTS, 1), LOOKAHEAD_NORM, np.float32)


def vector_dim(cfg: EnvConfig) -> int:
    """Length of the vector observation: 53, 2 more with `cfg.gap_features`, 5 more per vehicle of
    `cfg.traffic_features`."""
    return VECTOR_DIM + GAP_FEATURES * cfg.gap_features + TRAFFIC_FEATURES * cfg.traffic_features


def closing_speed(state: DrivingState, prev: DrivingState, dt: float) -> float:
    """m/s at which the gap to the vehicle ahead shrank over the last step of `dt` seconds; 0 unless
    a vehicle was in range on both steps, and at most SPEED_NORM either way (a cut-in or a lane
    change swaps the vehicle ahead, and its gap jumps)."""
    if not (math.isfinite(state.obstacle_distance) and math.isfinite(prev.obstacle_distance)):
        return 0.0
    return float(np.clip((prev.obstacle_distance - state.obstacle_distance) / dt, -SPEED_NORM, SPEED_NORM))


def emergency_brake(state: DrivingState, prev: DrivingState | None, dt: float, cfg: EnvConfig) -> bool:
    """Whether `EnvConfig.aeb_gap_m` brakes the step after `state` (`prev`: the state a step of `dt`
    seconds before it, None at the episode's start): the gap to the vehicle ahead is shorter than
    the ego needs to stop aeb_gap_m behind it after one more step at full throttle, if that vehicle
    brakes as hard from now. Its speed is the ego's less the closing speed, or 0 when it has just
    come into range (how fast it goes is not known yet: a cut-in, or the first step)."""
    if cfg.aeb_gap_m <= 0 or not math.isfinite(state.obstacle_distance) or state.speed < AEB_MIN_SPEED_MS:
        return False
    b = cfg.aeb_decel_ms2
    known = prev is not None and math.isfinite(prev.obstacle_distance)
    lead = max(state.speed - closing_speed(state, prev, dt), 0.0) if known else 0.0
    after = state.speed + b * dt
    needed = (state.speed + after) / 2 * dt + (after ** 2 - lead ** 2) / (2 * b) + cfg.aeb_gap_m
    return state.obstacle_distance < needed


def traffic_features(state: DrivingState, around: Surroundings, count: int) -> np.ndarray:
    """(count * TRAFFIC_FEATURES,) float32: the `count` other vehicles nearest the ego within
    TRAFFIC_RANGE_M along the route, nearest first, each as highway-env's kinematics observation
    has it, relative to the ego: 1 (present), metres ahead / TRAFFIC_RANGE_M (negative behind),
    metres to its left / LATERAL_NORM, its speed less the ego's / SPEED_NORM, and its lateral speed
    (positive left) / SPEED_NORM; rows of zeros where fewer are in range."""
    out = np.zeros((count, TRAFFIC_FEATURES), np.float32)
    v = np.asarray(around.vehicles, dtype=np.float64).reshape(-1, 4)
    v = v[np.abs(v[:, 0]) < TRAFFIC_RANGE_M]
    beside = v[:, 1] - state.lateral_offset
    nearest = np.argsort(np.hypot(v[:, 0], beside), kind="stable")[:count]
    n = len(nearest)
    out[:n, 0] = 1.0
    out[:n, 1] = v[nearest, 0] / TRAFFIC_RANGE_M
    out[:n, 2] = beside[nearest] / LATERAL_NORM
    out[:n, 3] = (v[nearest, 2] - state.speed) / SPEED_NORM
    out[:n, 4] = v[nearest, 3] / SPEED_NORM
    return out.reshape(-1)


def vector_features(state: DrivingState, cfg: EnvConfig, closing: float = 0.0,
                    around: Surroundings | None = None) -> np.ndarray:
    """The (vector_dim(cfg),) float32 vector observation; `closing` is `closing_speed` at this step,
    `around` the backend's `surroundings()` at it (needed with `cfg.traffic_features`)."""
    head = [state.speed / SPEED_NORM, state.lateral_offset / LATERAL_NORM, state.heading_error / math.pi]
    look = (np.asarray(state.lookahead, dtype=np.float32) / lookahead_scale(cfg)).reshape(-1)
    parts = [np.asarray(head, dtype=np.float32), look]
    if cfg.gap_features:
        gap = min(state.obstacle_distance, OBSTACLE_RANGE_M) / OBSTACLE_RANGE_M
        parts.append(np.asarray([gap, closing / SPEED_NORM], dtype=np.float32))
    if cfg.traffic_features:
        if around is None:
            raise ValueError("env.traffic_features needs the surroundings at this step")
        parts.append(traffic_features(state, around, cfg.traffic_features))
    return np.concatenate(parts).astype(np.float32)


def decode_lookahead(vector: np.ndarray, cfg: EnvConfig) -> np.ndarray:
    """The (25, 2) look-ahead points in metres (ego frame) back from a vector observation."""
    return np.asarray(vector[3:3 + 2 * LOOKAHEAD_POINTS]).reshape(LOOKAHEAD_POINTS, 2) * lookahead_scale(cfg)


def route_time_margin(cfg: EnvConfig, dt: float) -> float:
    """The episode's time budget (max_episode_steps * dt) over the time the route takes at the
    target speed: below ROUTE_TIME_MARGIN, even a perfect driver rarely completes it."""
    return cfg.max_episode_steps * dt / (cfg.route_length_m / cfg.reward.target_speed)


def stopped_time(state: DrivingState, stopped_s: float, dt: float, cfg: EnvConfig) -> float:
    """Seconds the car has now been stopped with the road ahead clear, given `stopped_s` before
    this step of `dt` seconds; any motion or an obstacle in reach starts the count again."""
    if state.speed < cfg.stuck_speed_ms and state.obstacle_distance >= cfg.stuck_clearance_m:
        return stopped_s + dt
    return 0.0


def termination(state: DrivingState, step: int, cfg: EnvConfig, stopped_s: float = 0.0) -> tuple[bool, bool, str | None]:
    """(terminated, truncated, reason), `stopped_s` being `stopped_time` after this step. A
    timeout truncates, and so does a completed route with `cfg.route_end_bootstraps`: only a
    truncation bootstraps."""
    if state.collision:
        return True, False, "collision"
    if state.off_road:
        return True, False, "off_road"
    if not cfg.lane_change and abs(state.lateral_offset) > cfg.max_lateral_deviation_m:
        return True, False, "lane_departure"
    if state.progress >= cfg.route_length_m:
        return not cfg.route_end_bootstraps, cfg.route_end_bootstraps, "route_completed"
    # stopped_s sums dt per step: thirty 0.1 s steps add up to 2.9999999999999996, not 3.
    if cfg.stuck_after_s > 0 and stopped_s >= cfg.stuck_after_s - 1e-9:
        return True, False, "stuck"
    if step >= cfg.max_episode_steps:
        return False, True, "timeout"
    return False, False, None


def collision_kind(lateral_offset: float, around: Surroundings) -> str:
    """One of `COLLISION_KINDS` for a collision, from the simulator's truth at its step: the nearest
    other vehicle (route coordinates, from the ego at `lateral_offset`) within `COLLISION_REACH_M`,
    in the ego's lane when their lateral offsets differ by less than half a lane."""
    v = around.vehicles
    if len(v) == 0:
        return "other"
    lateral = v[:, 1] - lateral_offset
    k = int(np.argmin(np.hypot(v[:, 0], lateral)))
    if math.hypot(v[k, 0], lateral[k]) > COLLISION_REACH_M:
        return "other"
    if abs(lateral[k]) >= around.lane_width / 2:
        return "side"
    return "rear_end" if v[k, 0] > 0 else "from_behind"


def headway_shortfall(state: DrivingState, r: RewardConfig) -> float:
    """How far the time gap to the vehicle ahead (obstacle_distance / speed) falls short of
    `r.headway_s`, from 0 (at or beyond it, or stopped) to 1 (touching)."""
    if r.headway_s <= 0 or state.speed <= 0 or not math.isfinite(state.obstacle_distance):
        return 0.0
    return float(np.clip(1.0 - state.obstacle_distance / (state.speed * r.headway_s), 0.0, 1.0))


def reward_components(
    state: DrivingState, prev: DrivingState, dt: float, reason: str | None, cfg: EnvConfig, braked: bool = False
) -> dict[str, float]:
    """The five unweighted components for the transition prev -> state (`braked`: emergency
    braking took the throttle on it, `emergency_brake`).

    Jerk uses the acceleration stored in `prev`, the same state the previous step was scored
    on, so it is consistent across steps (the old system mixed two sources). A lane invasion is
    penalised once, in safety; lane keeping only sees the continuous offset (from the route's
    centre or the car's lane's, `r.lane_keeping_reference`) and heading. Safety
    also charges following closer than `r.headway_s` (`headway_shortfall`), every step, and
    `r.stuck_penalty` on the step that ends the episode as 'stuck', and `r.aeb_penalty` on a
    braked step.
    """
    r = cfg.reward
    efficiency = float(np.clip(1.0 - abs(state.speed - r.target_speed) / r.target_speed, -1.0, 1.0))
    offset = state.lateral_offset
    if r.lane_keeping_reference == "lane" and state.lane_offset is not None:
        offset = state.lane_offset
    offset_term = 1.0 - min(abs(offset) / cfg.max_lateral_deviation_m, 1.0)
    heading_term = 1.0 - min(abs(state.heading_error) / (math.pi / 2), 1.0)
    lane_keeping = offset_term * heading_term
    if r.lane_keeping_speed_gate:
        lane_keeping *= min(max(state.speed, 0.0) / r.target_speed, 1.0)
    jerk = (state.acceleration - prev.acceleration) / dt
    comfort = -min(abs(jerk) / r.jerk_scale, 1.0)
    safety = -(
        r.collision_penalty * state.collision
        + r.off_road_penalty * state.off_road
        + r.lane_invasion_penalty * state.lane_invasion
        + r.headway_penalty * headway_shortfall(state, r)
        + r.stuck_penalty * (reason == "stuck")
        + r.aeb_penalty * braked
    )
    gained = state.progress - prev.progress
    if r.progress_speed_cap:
        gained = min(gained, r.target_speed * dt)
    progress = gained / r.progress_scale
    if reason == "route_completed":
        progress += r.completion_bonus
    return {
        "efficiency": efficiency,
        "lane_keeping": lane_keeping,
        "comfort": comfort,
        "safety": float(safety),
        "progress": float(progress),
    }


def weighted_components(components: dict[str, float], r: RewardConfig) -> dict[str, float]:
    """Each component times its weight; the step reward is their sum."""
    weights = {
        "efficiency": r.w_efficiency,
        "lane_keeping": r.w_lane_keeping,
        "comfort": r.w_comfort,
        "safety": r.w_safety,
        "progress": r.w_progress,
    }
    return {k: float(weights[k] * components[k]) for k in REWARD_COMPONENTS}
