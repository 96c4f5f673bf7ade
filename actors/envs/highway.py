"""The embedded driving simulator: highway-env's racetrack (curves, two lanes, IDM traffic) with
continuous steering and throttle/brake, seen by an 84x84 grayscale top-down camera.

The route is the lane the ego vehicle starts in, followed around the track; lateral offset,
heading error, progress and look-ahead points are measured against it, as the CARLA backend
measures them against its waypoint route. The road is both lanes: with `env.lane_change` the ego
may drive in the other one (each marking crossed is a lane invasion) and only leaving the road
ends the episode. Scenarios 1 and 2 place their traffic around the ego (actors/envs/traffic.py).
"""

from __future__ import annotations

import math

import numpy as np
from highway_env.envs.racetrack_env import RacetrackEnv
from highway_env.vehicle.kinematics import Vehicle

from actors.envs import traffic
from actors.envs.render import TopDownCamera
from common.backends import BackendSpec, register
from common.config import Config, EnvConfig, TrainingStart
from common.driving import FRAME_SIZE, LOOKAHEAD_POINTS, OBSTACLE_RANGE_M, DrivingState, Surroundings, to_ego_frame, wrap_angle

LaneIndex = tuple[str, str, int]
VIDEO_SIZE = 256
VIDEO_SCALING = 4.0
ROAD_SEAM_M = 0.1
"""Tolerance that closes the seams between highway-env's racetrack lanes (see `_on_road`)."""
START_CLEARANCE_M = 20.0  # highway-env's own spacing between vehicles it places at reset


class ForwardOnlyVehicle(Vehicle):
    """highway-env's kinematic ego, except that braking stops it and holds it.

    highway-env integrates speed down to Vehicle.MIN_SPEED = -40 m/s, so a held negative
    throttle_brake drove the car backwards. CARLA's brake (our CARLA backend leaves the reverse
    gear off) stops the car: one action, one meaning on both backends. Learned policies that
    slowed for the S-bend did reverse, at up to 10 m/s, and left the road backwards."""

    def step(self, dt: float) -> None:
        super().step(dt)
        # The position moved with the speed from before this tick's acceleration, so a speed
        # floored at 0 here never moves the car backwards, at any simulation frequency.
        self.speed = max(self.speed, 0.0)


class HighwayBackend:
    """`DrivingBackend` over highway-env's RacetrackEnv."""

    def __init__(self, cfg: EnvConfig, start: TrainingStart = "fixed") -> None:
        """`start`: where episodes start (`EmbeddedConfig.training_start`)."""
        emb = cfg.embedded
        self.cfg = cfg
        self.start = start
        self.dt = 1.0 / emb.policy_frequency
        self._env = RacetrackEnv(
            config={
                # Observations come from our camera; this one costs nothing.
                "observation": {"type": "AttributesObservation", "attributes": ["time"]},
                "action": {"type": "ContinuousAction", "longitudinal": True, "lateral": True},
                # Scenarios 1 and 2 place their own traffic after highway-env's reset.
                "other_vehicles": emb.traffic[0] if cfg.scenario == 0 else 0,
                # IDM and MOBIL see the cars on the next and previous segments too (highway-env
                # 1.12's fix, PR 667); without it, cars rear-ended or cut in right in front of
                # the ones across a segment boundary, blocking scenario 1's road with wrecks.
                "neighbour_vehicles_connected_lanes": cfg.scenario > 0,
                "simulation_frequency": emb.simulation_frequency,
                "policy_frequency": emb.policy_frequency,
                # Termination and truncation are ours (common.driving), not highway-env's.
                "duration": 1e9,
                "terminate_off_road": False,
            }
        )
        self._camera: TopDownCamera | None = None
        self._video: TopDownCamera | None = None
        self._route: LaneIndex = ("a", "b", 0)
        self._s = 0.0
        self._progress = 0.0
        self._speed = 0.0
        self._lane_id = 0
        self._route_start: dict[tuple[str, str], float] = {}
        self._lap = 0.0

    # -- route geometry ------------------------------------------------------------------
    def _next_on_route(self, index: LaneIndex) -> LaneIndex:
        graph = self._env.road.network.graph
        _from, _to, lane_id = index
        next_to = next(iter(graph[_to]))  # the racetrack is one loop: one successor per node
        return _to, next_to, min(lane_id, len(graph[_to][next_to]) - 1)

    def _advance_route(self, position: np.ndarray) -> tuple[float, float, float]:
        """Moves the route pointer to the segment the vehicle is on.

        Returns (s, lateral, passed): the position on that segment and the length of the
        segments left behind, so progress stays continuous across segment boundaries. The test
        is "the next segment is nearer" rather than "s > length" because a circular lane's s
        wraps around to negative values past its end.
        """
        network = self._env.road.network
        lane = network.get_lane(self._route)
        passed = 0.0
        while True:
            nxt = self._next_on_route(self._route)
            next_lane = network.get_lane(nxt)
            if next_lane.distance(position) >= lane.distance(position):
                break
            passed += lane.length
            self._route, lane = nxt, next_lane
        s, lat = lane.local_coordinates(position)
        return s, lat, passed

    def _lookahead(self, s: float) -> np.ndarray:
        network = self._env.road.network
        index, lane = self._route, network.get_lane(self._route)
        points = np.empty((LOOKAHEAD_POINTS, 2))
        target = s
        for k in range(LOOKAHEAD_POINTS):
            target += self.cfg.lookahead_spacing_m
            while target > lane.length:
                target -= lane.length
                index = self._next_on_route(index)
                lane = network.get_lane(index)
            points[k] = lane.position(target, 0.0)
        return points

    # -- the backend ---------------------------------------------------------------------
    def _state(self, s: float, lat: float, acceleration: float, lane_invasion: bool) -> DrivingState:
        ego = self._env.vehicle
        lane = self._env.road.network.get_lane(self._route)
        ego_points = to_ego_frame(self._lookahead(s), ego.position, ego.heading)
        # highway-env's y axis points right of the direction of travel (screen coordinates),
        # ours points left: flip every lateral quantity.
        ego_points[:, 1] *= -1.0
        return DrivingState(
            speed=float(ego.speed),
            lateral_offset=float(-lat),
            heading_error=float(-wrap_angle(ego.heading - lane.heading_at(s))),
            acceleration=float(acceleration),
            collision=bool(ego.crashed),
            off_road=not self._on_road(),
            lane_invasion=lane_invasion,
            progress=float(self._progress),
            obstacle_distance=self._obstacle_distance(-lat),
            lookahead=ego_points.astype(np.float32),
            lane_offset=-float(ego.lane.local_coordinates(ego.position)[1]),
        )

    def _on_road(self) -> bool:
        """On a lane of the road. highway-env's `on_road` asks the nearest lane alone, and on the
        slant segment (f, g) the two 5 m lanes lie 5.09 m apart: the 9 cm seam between them is
        off every lane, so a lane change there read as leaving the road."""
        ego = self._env.vehicle
        lanes = self._env.road.network.graph[ego.lane_index[0]][ego.lane_index[1]]
        return bool(ego.on_road) or any(lane.on_lane(ego.position, margin=ROAD_SEAM_M) for lane in lanes)

    def _obstacle_distance(self, lateral: float) -> float:
        """Bumper to bumper along the route to the nearest vehicle ahead whose centre is within
        half a lane of the ego's `lateral` offset, up to OBSTACLE_RANGE_M (highway-env's own
        neighbour search stops at the end of the ego's road segment)."""
        ego = self._env.vehicle
        half_lane = self._env.road.network.get_lane(self._route).width_at(self._s) / 2
        gap = min((ahead - (ego.LENGTH + v.LENGTH) / 2 for v, ahead, lat in self._others()
                   if ahead > 0 and abs(lat - lateral) < half_lane), default=math.inf)
        return max(float(gap), 0.0) if gap <= OBSTACLE_RANGE_M else math.inf

    def _frame(self) -> np.ndarray:
        road = self._env.road
        if self._camera is None:
            # The racetrack geometry is the same every episode: draw it once.
            emb = self.cfg.embedded
            self._camera = TopDownCamera(road, FRAME_SIZE, emb.render_scaling, emb.camera_vehicles, emb.camera_heading_up)
        ego = self._env.vehicle
        ahead = self.cfg.embedded.camera_ahead_m * np.array([math.cos(ego.heading), math.sin(ego.heading)])
        return self._camera.gray(road, ego.position + ahead, ego)

    def reset(self, seed: int | None) -> tuple[np.ndarray, DrivingState]:
        self._env.reset(seed=seed)
        if not self.cfg.embedded.brake_reverses:
            # RacetrackEnv builds the ego from its action type's class; give that object ours.
            self._env.vehicle.__class__ = ForwardOnlyVehicle
        scenario = self.cfg.scenario
        if self.start != "fixed" and self._starts_elsewhere():
            self._start_anywhere(with_lead=self.start == "anywhere_with_lead" and scenario == 0)
        ego = self._env.vehicle
        if scenario > 0:
            traffic.place(self._env.road, ego, scenario, self.cfg.embedded.traffic[scenario], self._env.np_random)
        self._route = ego.lane_index
        self._measure_route()
        self._lane_id = ego.lane_index[2]
        self._progress = 0.0
        self._speed = float(ego.speed)
        self._s, lat, _ = self._advance_route(ego.position)
        return self._frame(), self._state(self._s, lat, 0.0, False)

    def _starts_elsewhere(self) -> bool:
        """Whether this episode starts away from the fixed place (`training_start_fraction`). At
        1 no draw is taken, so the seeds' starts stay those the measured arms were run with."""
        fraction = self.cfg.embedded.training_start_fraction
        return fraction >= 1.0 or self._env.np_random.uniform() < fraction

    def _start_anywhere(self, with_lead: bool) -> None:
        """Moves the ego to a random lane and place on the track (drawn from the episode's seed)
        and, `with_lead`, highway-env's lead car (the vehicle it places right after the ego) to a
        random place on the segment ahead in the ego's lane; removes the rest of the traffic within
        START_CLEARANCE_M of either, so the episode does not open on a crash."""
        env = self._env
        network, rng, ego = env.road.network, env.np_random, env.vehicle
        index = network.random_lane_index(rng)
        _place(ego, network, index, rng.uniform(0.0, network.get_lane(index).length))
        placed = [ego]
        if with_lead and len(env.road.vehicles) > 1:
            lead, ahead = env.road.vehicles[1], self._next_on_route(index)
            _place(lead, network, ahead, rng.uniform(0.0, network.get_lane(ahead).length))
            placed.append(lead)
        env.road.vehicles = placed + [
            v for v in env.road.vehicles
            if v not in placed and all(np.linalg.norm(v.position - p.position) >= START_CLEARANCE_M for p in placed)]

    def _measure_route(self) -> None:
        """Where each segment starts along the route's lane, from the route's first segment on."""
        self._route_start, index, s = {}, self._route, 0.0
        while index[:2] not in self._route_start:
            self._route_start[index[:2]] = s
            s += self._env.road.network.get_lane(index).length
            index = self._next_on_route(index)
        self._lap = s

    def _route_coordinates(self, position: np.ndarray, segment: tuple[str, str]) -> tuple[float, float]:
        """(s along the route's lane from its first segment's start, lateral offset, positive left)
        of a point on `segment`."""
        lane = self._env.road.network.get_lane((*segment, self._route[2]))
        s, lat = lane.local_coordinates(position)
        return self._route_start[segment] + s, -lat

    def _others(self) -> list[tuple[Vehicle, float, float]]:
        """(vehicle, metres ahead of the ego along the route, lateral offset) of every other vehicle."""
        ego = self._env.vehicle
        ego_s = self._route_start[self._route[:2]] + self._s
        rows = []
        for v in self._env.road.vehicles:
            if v is not ego:
                s, lat = self._route_coordinates(v.position, v.lane_index[:2])
                rows.append((v, (s - ego_s + self._lap / 2) % self._lap - self._lap / 2, lat))
        return rows

    def surroundings(self) -> Surroundings:
        road, ego = self._env.road, self._env.vehicle
        segment = self._route[:2]
        rows = []
        for v, ahead, lat in self._others():
            lane = road.network.get_lane((*v.lane_index[:2], self._route[2]))
            drift = -float(v.speed) * math.sin(v.heading - lane.heading_at(lane.local_coordinates(v.position)[0]))
            rows.append((ahead, lat, float(v.speed), drift))
        network = road.network
        lanes = []
        for lane in network.graph[segment[0]][segment[1]]:
            centre = lane.position(lane.local_coordinates(ego.position)[0], 0.0)
            lanes.append(self._route_coordinates(centre, segment)[1])
        width = network.get_lane(self._route).width_at(self._s)
        return Surroundings(np.sort(np.asarray(lanes)), float(width), np.asarray(rows, dtype=np.float64).reshape(-1, 4))

    def step(self, action: np.ndarray) -> tuple[np.ndarray, DrivingState]:
        steer, throttle_brake = float(action[0]), float(action[1])
        self._env.step(np.array([throttle_brake, steer], dtype=np.float32))
        ego = self._env.vehicle
        s, lat, passed = self._advance_route(ego.position)
        self._progress += passed + s - self._s
        self._s = s
        acceleration = (float(ego.speed) - self._speed) / self.dt
        self._speed = float(ego.speed)
        lane_id = ego.lane_index[2]
        lane_invasion = lane_id != self._lane_id
        self._lane_id = lane_id
        return self._frame(), self._state(s, lat, acceleration, lane_invasion)

    def render_rgb(self) -> np.ndarray:
        road = self._env.road
        if self._video is None:
            self._video = TopDownCamera(road, VIDEO_SIZE, VIDEO_SCALING)
        return self._video.rgb(road, self._env.vehicle.position)

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self._env.close()


def _place(vehicle, network, index: LaneIndex, s: float) -> None:
    """Puts `vehicle` on the centre of lane `index` at `s`, heading along it; a traffic vehicle
    also targets that lane (it would steer back to its old one otherwise)."""
    lane = network.get_lane(index)
    vehicle.position, vehicle.heading = lane.position(s, 0.0), lane.heading_at(s)
    vehicle.lane_index, vehicle.lane = index, lane
    if hasattr(vehicle, "target_lane_index"):
        vehicle.target_lane_index = index


def _make(cfg: Config, slot: int, training: bool) -> HighwayBackend:
    """Training envs honour env.embedded.training_start; evaluation envs start at the fixed place."""
    return HighwayBackend(cfg.env, cfg.env.embedded.training_start if training else "fixed")


SPEC = register(BackendSpec(
    name="embedded",
    make=_make,
    step_seconds=lambda cfg: 1.0 / cfg.env.embedded.policy_frequency,
    max_steer_rad=math.pi / 4,  # highway-env's steering_range
    config_section="env.embedded",
))
