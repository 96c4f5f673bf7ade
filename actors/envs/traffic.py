"""Traffic of scenarios 1 and 2 on the embedded racetrack, placed around the ego from the episode's
seed (highway-env's `np_random`, seeded by `reset(seed)`), so an episode is reproducible from it.

highway-env's own placement (scenario 0) puts a lead car on the segment after the ego's and the
rest anywhere on the track, farther than 20 m from every other car: the extra traffic is out of
reach. Here every vehicle is placed at a distance along its lane from the ego:

- scenario 1, traffic in the way: a blocker in the ego's lane 35-60 m ahead, stopped (a car that
  never moves) or crawling at 1-2.5 m/s (IDM, no lane changes), and the
  rest ahead at 3-9 m/s, alternating between the other lane (from 10 m ahead) and the ego's lane
  beyond the blocker, each keeping to its lane (with lane changes, the faster cars cut into the
  queue behind the blocker and wrecks closed both lanes). Following the blocker leaves the route
  unfinished at the timeout: the ego must pass it in the other lane, between that lane's cars.
- scenario 2, dense: a slow car (2-4 m/s) in the ego's lane 25-50 m ahead and the rest in both
  lanes from 50 m behind to 150 m ahead, gaps of 12-35 m, speeds 3-9 m/s. Every IDM vehicle here
  changes lanes by MOBIL with politeness 0 and a low gain threshold, so cars from the other lane
  cut in front of the ego when that gains them speed.
"""

from __future__ import annotations

import numpy as np
from highway_env.road.road import Road
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle

LaneIndex = tuple[str, str, int]

MIN_GAP_M = 12.0
"""Least distance along a lane between two placed vehicles (centre to centre; a car is 5 m long)."""
EGO_CLEARANCE_M = 12.0
"""No vehicle is placed nearer than this to the ego along its lane, in either lane."""
CUT_IN_GAIN = 0.1
"""MOBIL's acceleration gain threshold (m/s^2) of scenario 2's traffic (highway-env's default 0.2)."""


class TrafficCar(IDMVehicle):
    """highway-env's IDM and MOBIL car, except that

    - braking stops it and holds it, as the ego's does (`ForwardOnlyVehicle`): highway-env
      integrates speed down to -40 m/s, and IDM cars braking hard behind a stopped one reversed
      into the cars behind them (and the ego);
    - it does not collide with other traffic, only with the ego: on the S-bend's 15 m curves
      highway-env's lane controller lets MOBIL's cars sideswipe each other, and the wrecks (a
      crashed car stops for good) closed both lanes for the rest of the episode in 5 of 20 dense
      training episodes. The ego collides with every car."""

    def step(self, dt: float) -> None:
        super().step(dt)
        self.speed = max(self.speed, 0.0)

    def handle_collisions(self, other, dt: float = 0) -> None:
        if not isinstance(other, TrafficCar):
            super().handle_collisions(other, dt)


class StoppedCar(TrafficCar):
    """A broken-down car: it stands where it was placed."""

    def act(self, action: dict | str | None = None) -> None:
        self.action = {"steering": 0.0, "acceleration": 0.0}


def place(road: Road, ego: Vehicle, scenario: int, count: int, rng: np.random.Generator) -> None:
    """Replaces every vehicle but the ego by `count` vehicles of `scenario` (1 or 2)."""
    road.vehicles = [ego]
    road.objects = []
    if count == 0:
        return
    lane = ego.lane_index
    s0 = road.network.get_lane(lane).local_coordinates(ego.position)[0]
    other = _other_lane(road, lane)
    if scenario == 1:
        _scenario_1(road, lane, other, s0, count, rng)
    else:
        _scenario_2(road, lane, other, s0, count, rng)


def _scenario_1(road: Road, lane: LaneIndex, other: LaneIndex | None, s0: float, count: int,
                rng: np.random.Generator) -> None:
    blocker = float(rng.uniform(35.0, 60.0))
    if rng.uniform() < 0.5:
        _add(road, StoppedCar, lane, s0, blocker, 0.0)
    else:
        _add(road, TrafficCar, lane, s0, blocker, float(rng.uniform(1.0, 2.5)), lane_change=False)
    ahead = {lane: blocker, other: float(rng.uniform(10.0, 25.0)) - MIN_GAP_M}
    for k in range(count - 1):
        target = other if (k % 2 == 0 and other is not None) else lane
        ahead[target] += float(rng.uniform(MIN_GAP_M, 40.0))
        _add(road, TrafficCar, target, s0, ahead[target], float(rng.uniform(3.0, 9.0)), lane_change=False)


def _scenario_2(road: Road, lane: LaneIndex, other: LaneIndex | None, s0: float, count: int,
                rng: np.random.Generator) -> None:
    slow = float(rng.uniform(25.0, 50.0))
    placed = {lane: [slow], other: []}
    _add(road, TrafficCar, lane, s0, slow, float(rng.uniform(2.0, 4.0)), cut_in=True)
    lanes = [lane] if other is None else [lane, other]
    for _ in range(200 * count):
        if len(road.vehicles) - 1 >= count:
            break
        target = lanes[int(rng.integers(len(lanes)))]
        d = float(rng.uniform(-50.0, 150.0))
        if abs(d) < EGO_CLEARANCE_M or any(abs(d - x) < MIN_GAP_M for x in placed[target]):
            continue
        placed[target].append(d)
        _add(road, TrafficCar, target, s0, d, float(rng.uniform(3.0, 9.0)), cut_in=True)


def _other_lane(road: Road, lane: LaneIndex) -> LaneIndex | None:
    _from, _to, lane_id = lane
    ids = [i for i in range(len(road.network.graph[_from][_to])) if i != lane_id]
    return (_from, _to, ids[0]) if ids else None


def _add(road: Road, cls: type[Vehicle], lane: LaneIndex, s0: float, ahead: float, speed: float,
         lane_change: bool = True, cut_in: bool = False) -> None:
    """A `cls` vehicle `ahead` metres (negative: behind) along lane `lane`'s successors (or
    predecessors) from the ego's longitudinal position `s0` on it, at `speed`, which an IDM vehicle
    keeps as its target."""
    index, s = _along(road, lane, s0 + ahead)
    vehicle = cls.make_on_lane(road, index, longitudinal=s, speed=speed)
    if isinstance(vehicle, IDMVehicle):
        vehicle.target_speed = speed
        vehicle.enable_lane_change = lane_change
        if cut_in:
            vehicle.POLITENESS, vehicle.LANE_CHANGE_MIN_ACC_GAIN = 0.0, CUT_IN_GAIN
    road.vehicles.append(vehicle)


def _along(road: Road, index: LaneIndex, s: float) -> tuple[LaneIndex, float]:
    """(lane, s on it) of the point `s` metres along lane `index` from its start, walking on to the
    next segments (or back to the previous ones for s < 0) in the same lane."""
    graph, lane_id = road.network.graph, index[2]
    while s < 0.0:
        prev = next(a for a in graph if index[0] in graph[a])  # the racetrack is one loop
        index = (prev, index[0], min(lane_id, len(graph[prev][index[0]]) - 1))
        s += road.network.get_lane(index).length
    while s > road.network.get_lane(index).length:
        s -= road.network.get_lane(index).length
        nxt = next(iter(graph[index[1]]))
        index = (index[1], nxt, min(lane_id, len(graph[index[1]][nxt]) - 1))
    return index, s
