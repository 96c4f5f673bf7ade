"""The CARLA backend on the `carla==0.9.16` client: synchronous mode at 20 Hz, the Traffic Manager
synchronous on this env's own port, an ego vehicle with an RGB camera (256x144, FOV 90, matched to
each tick by frame id) and collision, lane-invasion and obstacle sensors, NPC traffic on autopilot.

CARLA's world frame is left-handed (y to the right, yaw clockwise, degrees); the route and the
vehicle pose are flipped into the right-handed frame of `common.driving` (y' = -y, yaw' = -yaw)
before anything is measured, so a positive lateral offset is left of the route on both backends.
A hung or dead server raises `SimulatorFailure` from `step()`; the next `reset()` relaunches it.

The client runs in a process of its own, a new one for each server incarnation (`CarlaSession`
there, `CarlaBackend` here). libcarla 0.9.16 keeps every Traffic Manager of a process in one static
map keyed by port and runs a cycle of each synchronous one from every world tick, and a Traffic
Manager cycle calls its own server from a thread that catches nothing: once its server is dead or
hung, its next cycle (a tick of any world in the process, its `shut_down()`, a map load in any
client) ends the process. So a relaunch discards the client process with the server, and no two
envs share a process's Traffic Managers.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import queue
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from actors.envs.carla_server import CarlaServer, Ports
from actors.envs.route import Route
from common.backends import BackendSpec, register
from common.config import CarlaConfig, Config, ConfigError, EnvConfig
from common.driving import (
    CARLA_FPS,
    FRAME_SIZE,
    LOOKAHEAD_POINTS,
    OBSTACLE_RANGE_M,
    DrivingState,
    Surroundings,
    to_ego_frame,
)
from common.env import SimulatorFailure
from replay_server.server import die_with_parent

log = logging.getLogger(__name__)

OBSTACLE_HIT_RADIUS_M = 0.5
"""The obstacle sensor sweeps a sphere this wide (its `hit_radius`) and reports how far its centre
went: the obstacle's surface lies this much further (ObstacleDetectionSensor.cpp)."""
SENSOR_ATTRIBUTES = {
    "sensor.camera.rgb": {"image_size_x": "256", "image_size_y": "144", "fov": "90"},
    # CARLA's default sees only 5 m ahead, and static geometry too (walls, poles, parked props),
    # which would read as an obstacle on every narrow street
    "sensor.other.obstacle": {"distance": f"{OBSTACLE_RANGE_M:g}", "only_dynamics": "true",
                              "hit_radius": f"{OBSTACLE_HIT_RADIUS_M:g}"},
}
CAMERA_X, CAMERA_Z = 1.6, 1.5
ROUTE_STEP_M = 2.0
RESET_ATTEMPTS = 3
SAME_SEED_ATTEMPTS = 2
"""Resets with the episode's own seed before the last attempt tries another seed (another spawn
point and route): a failure that follows the seed does not go away with a relaunch."""
SPAWN_TRIES = 5
"""Ego spawns tried per reset before the session gives up and the backend recovers the server."""
SPAWN_LIFT_M = 0.2
"""How much higher each further try spawns at a route file's fixed start."""
ANSWER_TIMEOUTS = 4
"""A client process that has not answered a step within this many `carla.timeout_s` is taken for
hung: its own time-outs fire sooner, but libcarla waits for a Traffic Manager cycle without one."""
START_SLACK_S = 60.0
"""Seconds a new client process may take to start, on top of `carla.setup_timeout_s` to connect."""
MAX_LANES_A_SIDE = 4
"""Neighbour lanes `surroundings` walks to on either side of the ego's."""
SURROUNDINGS_WINDOW_M = 150.0
"""Route distance from the ego within which `surroundings` reports other vehicles."""
EVENT_GRACE_S = 0.01
"""How long after a tick returned its collision and lane-invasion events are waited for: libcarla
may return the tick before its on-tick callbacks (the lane-invasion sensor) ran, and collision data
comes on a stream of its own. The camera wait usually spends this already; later events count on
the next step."""
INVASION_GAP_FRAMES = 2 * CARLA_FPS
"""Lane-invasion events at most this many frames apart are one crossing: the sensor reports each
bounding-box corner crossing a marking, so a lane change sends up to four events, spread over
seconds when it is shallow."""
COLLISION_MEMORY_FRAMES = 5 * CARLA_FPS
"""A collision with the same other actor within this many frames is the same one (the leaderboard's
CollisionTest.MAX_ID_TIME, 5 s): the sensor reports a contact again on every tick it lasts."""


def other_seed(seed: int) -> int:
    """The seed a reset tries after `SAME_SEED_ATTEMPTS` failures with `seed`."""
    return int(np.random.SeedSequence([seed, SAME_SEED_ATTEMPTS]).generate_state(1)[0])


def load_route_file(path: str, min_length: float) -> np.ndarray:
    """CARLA-frame (x, y) points of a route file, checked: a clear `ConfigError` for a missing or
    malformed file, or a route shorter than the episode's `min_length`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"carla.route_file '{p}' does not exist")
    try:
        points = np.loadtxt(p, dtype=np.float64, comments="#", ndmin=2)
    except ValueError as exc:
        raise ConfigError(f"carla.route_file '{p}' must hold 'x y' numbers, one point per line: {exc}") from exc
    if points.shape[1] != 2 or len(points) < 2 or not np.isfinite(points).all():
        raise ConfigError(f"carla.route_file '{p}' must hold at least 2 finite 'x y' points, got shape {points.shape}")
    length = float(np.hypot(*np.diff(points, axis=0).T).sum())
    if length < min_length:
        raise ConfigError(f"carla.route_file '{p}' is {length:.0f} m long, shorter than env.route_length_m={min_length:.0f}")
    return points


def _goes_along(lane: Any, heading: float) -> bool:
    """Whether map waypoint `lane` points within 90 degrees of `heading` (radians, our right-handed
    frame): the road is the carriageway the route drives on, so the oncoming lane is off it. In a
    junction every lane counts (lanes cross there)."""
    return bool(lane.is_junction) or math.cos(-math.radians(lane.transform.rotation.yaw) - heading) > 0.0


def _offset_from(lane: Any, position: np.ndarray) -> float:
    """Signed distance, m (positive left), of `position` (our right-handed frame) from the centre
    line of map waypoint `lane`, which the map puts on its lane's centre."""
    centre = lane.transform.location
    heading = -math.radians(lane.transform.rotation.yaw)
    return float(to_ego_frame(position[None], np.array([centre.x, -centre.y]), heading)[0, 1])


def to_gray(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """A CARLA BGRA image -> ((84, 84) uint8 grayscale, (H, W, 3) uint8 RGB)."""
    bgra = np.frombuffer(image.raw_data, dtype=np.uint8).reshape(image.height, image.width, 4)
    rgb = np.ascontiguousarray(bgra[:, :, 2::-1])
    gray = Image.fromarray(rgb).convert("L").resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8), rgb


def counts_as_collision(type_id: str) -> bool:
    """Whether a collision with an actor of `type_id` counts, as in the leaderboard's CollisionTest:
    vehicles, walkers, static objects and traffic furniture, but not the sidewalk (a curb scrape;
    leaving the road is `off_road`'s business) nor anything else."""
    if "sidewalk" in type_id:
        return False
    return any(kind in type_id for kind in ("static", "traffic", "vehicle", "walker"))


class _Sensors:
    """One episode's sensor outputs: camera images by frame id and events of the other sensors,
    each taken on the step of the frame it carries (or, when it came later, on the next step)."""

    def __init__(self) -> None:
        self.images: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.collisions: list[tuple[int, int, str]] = []  # (frame, other actor id, its type_id)
        self.invasions: list[int] = []
        self.obstacles: list[tuple[int, float]] = []
        self.last_collision: dict[int, int] = {}  # the frame each other actor was last counted at
        self.last_invasion: int | None = None  # the frame of the last lane-invasion event

    def on_collision(self, event: Any) -> None:
        with self.lock:
            self.collisions.append((event.frame, event.other_actor.id, event.other_actor.type_id))

    def on_invasion(self, event: Any) -> None:
        with self.lock:
            self.invasions.append(event.frame)

    def on_obstacle(self, event: Any) -> None:
        with self.lock:
            self.obstacles.append((event.frame, float(event.distance)))

    def events(self, frame: int) -> tuple[bool, bool, float]:
        """(a new collision, a new lane crossing, obstacle distance) in the events up to `frame`,
        which are then forgotten; those of later frames wait for their own step. An obstacle
        event of an earlier frame came after its step and is reported now, as collisions are."""
        with self.lock:
            collisions = sorted(c for c in self.collisions if c[0] <= frame)
            invasions = sorted(f for f in self.invasions if f <= frame)
            seen = [d for f, d in self.obstacles if f <= frame]
            self.collisions = [c for c in self.collisions if c[0] > frame]
            self.invasions = [f for f in self.invasions if f > frame]
            self.obstacles = [(f, d) for f, d in self.obstacles if f > frame]
        collision = any([self._new_collision(*c) for c in collisions])  # a list: every event is remembered
        invasion = any([self._new_crossing(f) for f in invasions])
        return collision, invasion, min(seen, default=math.inf)

    def _new_collision(self, frame: int, other: int, type_id: str) -> bool:
        """A counted collision other than a repeat of the last one with the same actor. Level
        geometry all has id 0, so it is never taken for a repeat (the leaderboard does the same)."""
        if not counts_as_collision(type_id):
            return False
        last = self.last_collision.get(other)
        if other and last is not None and frame - last <= COLLISION_MEMORY_FRAMES:
            return False
        self.last_collision[other] = frame
        return True

    def _new_crossing(self, frame: int) -> bool:
        """Whether this lane-invasion event starts a crossing rather than continuing the last one."""
        last = self.last_invasion
        self.last_invasion = frame if last is None else max(frame, last)  # a late event of an older frame
        return last is None or frame - last > INVASION_GAP_FRAMES


class CarlaSession:
    """One client of the server incarnation at `ports`, in the process it lives in: the driving
    contract without recovery. A failure raises, and `CarlaBackend` discards the process."""

    dt = 1.0 / CARLA_FPS

    def __init__(self, env_cfg: EnvConfig, cfg: CarlaConfig, ports: Ports) -> None:
        self.env_cfg = env_cfg
        self.cfg = cfg
        self.ports = ports
        self.carla = importlib.import_module("carla")
        self.route_points = load_route_file(cfg.route_file, env_cfg.route_length_m) if cfg.route_file else None
        self._connect()
        self._ego: Any = None
        self._sensor_actors: list[Any] = []
        self._npcs: list[int] = []
        self._sensors = _Sensors()
        self._route: Route | None = None
        self._rgb = np.zeros((144, 256, 3), np.uint8)
        self._speed = 0.0
        self._s_start = 0.0
        self._last_s = 0.0
        self._tick_s, self._ticks = 0.0, 0
        self.npc_spawn_failures = 0

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> None:
        self.client = self.carla.Client(self.cfg.host, self.ports.rpc, worker_threads=self.cfg.client_worker_threads)
        self.client.set_timeout(self.cfg.setup_timeout_s)  # a cold server loads its map for minutes
        world = self.client.get_world()
        if not world.get_map().name.endswith(self.cfg.town):
            world = self.client.load_world(self.cfg.town)
        self.blueprints = world.get_blueprint_library()
        # Cars only: "vehicle.*" also holds bicycles, motorbikes and trucks.
        self.cars = [bp for bp in self.blueprints.filter("vehicle.*")
                     if bp.has_attribute("base_type") and bp.get_attribute("base_type").as_str() == "car"]
        wanted = self.cfg.traffic[self.env_cfg.scenario]
        if wanted and not self.cars:
            # Not a server failure (a relaunched server has the same library): no RuntimeError, which
            # the backend answers with relaunches, but an error naming the problem, raised before
            # the world turns synchronous.
            raise ConfigError(
                f"carla.traffic asks for {wanted} NPC vehicles (scenario {self.env_cfg.scenario}), but the "
                f"server at {self.cfg.host}:{self.ports.rpc} has no vehicle blueprint with base_type 'car' "
                "(the attribute CARLA 0.9.16's blueprints carry); run a CARLA 0.9.16 server or set that traffic to 0")
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.dt
        world.apply_settings(settings)
        self.tm = self.client.get_trafficmanager(self.ports.tm)
        self.tm.set_synchronous_mode(True)
        threshold = self.cfg.hybrid_physics_from
        self.tm.set_hybrid_physics_mode(bool(threshold) and wanted >= threshold)
        self.tm.set_hybrid_physics_radius(self.cfg.hybrid_physics_radius_m)
        self.client.set_timeout(self.cfg.timeout_s)  # from here on, a slow answer is a hung server
        self.world = world
        self.map = world.get_map()
        if not self.cfg.launch:
            self._clear_leftovers()

    def _clear_leftovers(self) -> None:
        """Destroys the vehicles and sensors on a server we connected to: each env has a server of
        its own, so they are what an earlier client of this env (a killed client process, a
        crashed actor) left behind, its ego and NPCs standing on the spawn points."""
        actors = self.world.get_actors()
        ids = [a.id for a in actors.filter("sensor.*")] + [a.id for a in actors.filter("vehicle.*")]
        if ids:
            log.warning("destroying %d vehicles and sensors left on %s:%d by an earlier client",
                        len(ids), self.cfg.host, self.ports.rpc)
        self._destroy_ids(ids, "left by an earlier client")

    # -- episode ---------------------------------------------------------------------------
    def _route_for(self, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
        """(CARLA-frame route points, ego spawn transform)."""
        c = self.carla
        if self.route_points is not None:
            (x0, y0), (x1, y1) = self.route_points[0], self.route_points[1]
            ground = self.map.get_waypoint(c.Location(x=x0, y=y0, z=0.0)).transform.location.z
            yaw = math.degrees(math.atan2(y1 - y0, x1 - x0))
            return self.route_points, c.Transform(c.Location(x=x0, y=y0, z=ground + 0.5), c.Rotation(yaw=yaw))
        spawns = self.map.get_spawn_points()
        needed = self.env_cfg.route_length_m + LOOKAHEAD_POINTS * self.env_cfg.lookahead_spacing_m + 10.0
        for _ in range(20):  # a spawn point near a dead end gives a short route: try another one
            spawn = spawns[int(rng.integers(len(spawns)))]
            wp = self.map.get_waypoint(spawn.location)
            points = [(wp.transform.location.x, wp.transform.location.y)]
            for _ in range(int(needed / ROUTE_STEP_M) + 1):
                options = wp.next(ROUTE_STEP_M)
                if not options:
                    break
                wp = options[int(rng.integers(len(options)))]  # a random turn at junctions
                points.append((wp.transform.location.x, wp.transform.location.y))
            if len(points) * ROUTE_STEP_M >= needed:
                return np.asarray(points), spawn
        raise SimulatorFailure(f"no route of {needed:.0f} m from 20 spawn points of {self.cfg.town}")

    def _spawn_ego(self, rng: np.random.Generator) -> Any:
        """The ego's spawn transform, with the ego spawned there and the route from there set. A
        spawn collision (a vehicle on the spawn point, a road the spawn height does not clear) is
        no server failure: a generated route tries another spawn point, a route file's fixed start
        a little higher; only `SPAWN_TRIES` failures raise, for the backend to recover."""
        ego_bp = self.blueprints.find(self.cfg.vehicle)
        ego_bp.set_attribute("role_name", "hero")  # what hybrid physics and CARLA's tools look for
        for attempt in range(SPAWN_TRIES):
            points, ego_tf = self._route_for(rng)
            if self.route_points is not None:
                ego_tf.location.z += attempt * SPAWN_LIFT_M
            self._ego = self.world.try_spawn_actor(ego_bp, ego_tf)  # None on failure, a time-out included
            if self._ego is not None:
                self._route = Route(points * np.array([1.0, -1.0]))
                box = self._ego.bounding_box
                self._sensor_to_bumper = box.location.x + box.extent.x - CAMERA_X
                return ego_tf
            log.info("ego spawn at (%.1f, %.1f, %.1f) failed, try %d of %d", ego_tf.location.x, ego_tf.location.y,
                     ego_tf.location.z, attempt + 1, SPAWN_TRIES)
        raise RuntimeError(f"ego vehicle not spawned in {SPAWN_TRIES} tries on {self.cfg.town}")

    def _spawn(self, seed: int | None) -> int:
        c = self.carla
        rng = np.random.default_rng(seed)
        ego_tf = self._spawn_ego(rng)
        sensors = self._sensors = _Sensors()
        mount = c.Transform(c.Location(x=CAMERA_X, z=CAMERA_Z))
        for name, tf, callback in (
            ("sensor.camera.rgb", mount, sensors.images.put),
            ("sensor.other.collision", c.Transform(), sensors.on_collision),
            ("sensor.other.lane_invasion", c.Transform(), sensors.on_invasion),
            ("sensor.other.obstacle", mount, sensors.on_obstacle),
        ):
            bp = self.blueprints.find(name)
            for key, value in SENSOR_ATTRIBUTES.get(name, {}).items():
                bp.set_attribute(key, value)
            actor = self.world.spawn_actor(bp, tf, attach_to=self._ego)
            actor.listen(callback)
            self._sensor_actors.append(actor)
        self._spawn_traffic(rng, ego_tf)
        self.tm.set_random_device_seed(int(rng.integers(2**31)))
        frame = self.world.tick(self.cfg.timeout_s)
        for _ in range(self.cfg.settle_ticks):  # the first observation is the last settle tick's
            frame = self.world.tick(self.cfg.timeout_s)
        return frame

    def _spawn_traffic(self, rng: np.random.Generator, ego_tf: Any) -> None:
        cmd = self.carla.command
        free = [tf for tf in self.map.get_spawn_points() if tf.location.distance(ego_tf.location) > 10.0]
        wanted = self.cfg.traffic[self.env_cfg.scenario]
        count = min(wanted, len(free))
        cars = self.cars
        batch = [
            cmd.SpawnActor(cars[int(rng.integers(len(cars)))], free[i])
            .then(cmd.SetAutopilot(cmd.FutureActor, True, self.ports.tm))
            for i in rng.permutation(len(free))[:count]
        ]
        results = self.client.apply_batch_sync(batch, False)
        self._npcs = [r.actor_id for r in results if not r.error]
        failed = wanted - len(self._npcs)
        if failed:
            self.npc_spawn_failures += failed
            errors = sorted({r.error for r in results if r.error})
            log.warning("%d of %d NPC vehicles not spawned (%d free spawn points; %s)",
                        failed, wanted, len(free), "; ".join(errors) or "too few spawn points")

    def _destroy(self) -> None:
        """Stops the sensors and destroys everything this env spawned."""
        for sensor in self._sensor_actors:
            sensor.stop()
        ids = [a.id for a in self._sensor_actors] + ([self._ego.id] if self._ego is not None else []) + self._npcs
        self._destroy_ids(ids, "of the last episode")
        self._sensor_actors, self._ego, self._npcs = [], None, []

    def _destroy_ids(self, ids: list[int], what: str) -> None:
        """Destroys actors in one batch the server confirms, then ticks, so that none of them is
        still in the world when the next ego spawns (a synchronous world moves only on ticks)."""
        if not ids:
            return
        results = self.client.apply_batch_sync([self.carla.command.DestroyActor(i) for i in ids], False)
        errors = [r.error for r in results if r.error]
        if errors:
            log.warning("%d of %d actors %s not destroyed: %s", len(errors), len(ids), what, "; ".join(sorted(set(errors))))
        self.world.tick(self.cfg.timeout_s)

    def reset(self, seed: int | None) -> tuple[np.ndarray, DrivingState]:
        self._destroy()
        frame = self._spawn(seed)
        gray = self._camera(frame)
        self._speed, self._s_start = 0.0, 0.0
        state = self._state(frame)
        self._s_start = state.progress
        state.progress = 0.0
        return gray, state

    def step(self, action: np.ndarray) -> tuple[np.ndarray, DrivingState]:
        steer, throttle_brake = float(action[0]), float(action[1])
        control = self.carla.VehicleControl(
            throttle=max(throttle_brake, 0.0), steer=steer, brake=max(-throttle_brake, 0.0))
        self._ego.apply_control(control)
        start = time.perf_counter()
        frame = self.world.tick(self.cfg.timeout_s)
        ticked = time.perf_counter()
        self._tick_s += ticked - start
        self._ticks += 1
        gray = self._camera(frame)
        time.sleep(max(ticked + EVENT_GRACE_S - time.perf_counter(), 0.0))  # the frame's late events
        return gray, self._state(frame)

    def _camera(self, frame: int) -> np.ndarray:
        """The camera image of exactly `frame`: older images still queued are dropped."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            try:
                image = self._sensors.images.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise RuntimeError(f"no camera image for frame {frame} within {self.cfg.timeout_s} s") from None
            if image.frame == frame:
                gray, self._rgb = to_gray(image)
                return gray
            if image.frame > frame:
                raise RuntimeError(f"camera image of frame {image.frame} arrived while waiting for frame {frame}")

    def _state(self, frame: int) -> DrivingState:
        tf = self._ego.get_transform()
        v, fwd = self._ego.get_velocity(), tf.get_forward_vector()
        speed = v.x * fwd.x + v.y * fwd.y + v.z * fwd.z
        position = np.array([tf.location.x, -tf.location.y])
        s, lateral, heading_error, lookahead = self._route.measure(
            position, -math.radians(tf.rotation.yaw), self.env_cfg.lookahead_spacing_m)
        self._last_s = s
        collision, invasion, swept = self._sensors.events(frame)
        obstacle = max(swept + OBSTACLE_HIT_RADIUS_M - self._sensor_to_bumper, 0.0)  # the gap from the bumper
        lane = self.map.get_waypoint(tf.location, project_to_road=False, lane_type=self.carla.LaneType.Driving)
        off_road = lane is None or not _goes_along(lane, -math.radians(tf.rotation.yaw) - heading_error)
        lane_offset = None if off_road else _offset_from(lane, position)
        acceleration = (speed - self._speed) / self.dt
        self._speed = speed
        return DrivingState(
            speed=float(speed), lateral_offset=lateral, heading_error=heading_error,
            acceleration=float(acceleration), collision=collision, off_road=off_road,
            lane_invasion=invasion, progress=s - self._s_start, obstacle_distance=obstacle, lookahead=lookahead,
            lane_offset=lane_offset,
        )

    # -- the rest of the contract ----------------------------------------------------------
    def surroundings(self) -> Surroundings:
        """The other vehicles on the route within SURROUNDINGS_WINDOW_M of the ego, in route
        coordinates, and the driving lanes beside the ego's that go its lane's way (same sign of
        lane_id, as OpenDRIVE numbers them)."""
        tf = self._ego.get_transform()
        ego_s, _, _ = self._route.locate(np.array([tf.location.x, -tf.location.y]), self._last_s, SURROUNDINGS_WINDOW_M)
        others = [a for a in self.world.get_actors().filter("vehicle.*") if a.id != self._ego.id]
        rows = np.zeros((0, 4))
        if others:
            where = np.array([[a.get_transform().location.x, -a.get_transform().location.y] for a in others])
            velocity = np.array([[a.get_velocity().x, -a.get_velocity().y] for a in others])
            s, lateral, heading = self._route.locate(where, float(ego_s[0]), SURROUNDINGS_WINDOW_M)
            along = velocity[:, 0] * np.cos(heading) + velocity[:, 1] * np.sin(heading)
            drift = -velocity[:, 0] * np.sin(heading) + velocity[:, 1] * np.cos(heading)
            rows = np.stack([s - ego_s[0], lateral, along, drift], axis=1)
            # A car beyond either end of the route projects onto that end: it is not on the route.
            on_route = (s > 0.0) & (s < self._route.length)
            rows = rows[on_route & (np.abs(rows[:, 0]) < SURROUNDINGS_WINDOW_M)]
        here = self.map.get_waypoint(tf.location)
        lanes = [here]
        for side in ("get_left_lane", "get_right_lane"):
            lane = getattr(here, side)()
            for _ in range(MAX_LANES_A_SIDE):
                if lane is None or lane.lane_type != self.carla.LaneType.Driving or lane.lane_id * here.lane_id <= 0:
                    break
                lanes.append(lane)
                lane = getattr(lane, side)()
        centres = np.array([[w.transform.location.x, -w.transform.location.y] for w in lanes])
        _, offsets, _ = self._route.locate(centres, float(ego_s[0]), SURROUNDINGS_WINDOW_M)
        return Surroundings(np.sort(offsets), float(here.lane_width), rows)

    def render_rgb(self) -> np.ndarray:
        return self._rgb

    def metrics(self) -> dict[str, float]:
        """The mean tick and the NPCs not spawned, both since the last call."""
        tick_ms = 1000.0 * self._tick_s / self._ticks if self._ticks else 0.0
        failures = float(self.npc_spawn_failures)
        self._tick_s, self._ticks, self.npc_spawn_failures = 0.0, 0, 0
        return {"carla_tick_ms": tick_ms, "npc_spawn_failures": failures}

    def close(self) -> None:
        """Destroys what was spawned, turns synchronous mode off, so a server we connected to is
        not left waiting for ticks, and shuts the Traffic Manager down, freeing its port (only
        while the server answers: the Traffic Manager's last cycle calls it)."""
        self._destroy()
        settings = self.world.get_settings()
        settings.synchronous_mode = False
        settings.fixed_delta_seconds = None
        self.world.apply_settings(settings)
        self.tm.shut_down()


def _serve(conn: Connection, env_cfg: EnvConfig, cfg: CarlaConfig, ports: Ports, log_level: int) -> None:
    """The client process: starts a `CarlaSession`, then answers each (method, args) from
    `CarlaBackend` with ("ok", result) or ("error", exception), until "close"."""
    die_with_parent()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        session = CarlaSession(env_cfg, cfg, ports)
    except Exception as exc:  # whatever it is, the backend raises it
        conn.send(("error", exc))
        return
    conn.send(("ok", None))
    method = ""
    while method != "close":
        method, args = conn.recv()
        try:
            conn.send(("ok", getattr(session, method)(*args)))
        except Exception as exc:  # whatever it is, the backend raises it
            conn.send(("error", exc))


class CarlaBackend:
    """`DrivingBackend` over a CARLA server (env `slot` of the run, see `carla_server`) and a
    `CarlaSession` in a client process of its own; a hung or dead server is relaunched with a new
    client process."""

    dt = CarlaSession.dt

    def __init__(self, env_cfg: EnvConfig, cfg: CarlaConfig, slot: int) -> None:
        self.env_cfg = env_cfg
        self.cfg = cfg
        self.server = CarlaServer(cfg, slot)
        self.server.start()
        try:
            self._start_client()
        except BaseException:
            self.server.kill()
            raise
        self.episodes = 0
        self.broken = False
        self.npc_spawn_failures = 0.0

    # -- the client process ----------------------------------------------------------------
    def _start_client(self) -> None:
        """A client process with a session on the current server; what the session raised while
        starting is raised here."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of libcarla's inherited
        self._conn, child = context.Pipe()
        log_level = logging.getLogger().getEffectiveLevel()
        self.client = context.Process(target=_serve, args=(child, self.env_cfg, self.cfg, self.server.ports, log_level),
                                      name=f"carla-client-{self.server.slot}", daemon=True)
        self.client.start()
        child.close()
        try:
            self._answer("start", self.cfg.setup_timeout_s + START_SLACK_S)
        except BaseException:
            self._stop_client()
            raise

    def _stop_client(self) -> None:
        """Kills the client process: whatever libcarla holds there, a Traffic Manager bound to a
        dead server above all, ends with it."""
        self.client.kill()
        self.client.join()
        self._conn.close()

    def _request(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """The session's answer to `method(*args)`; `timeout` defaults to ANSWER_TIMEOUTS ticks' time-outs."""
        timeout = ANSWER_TIMEOUTS * self.cfg.timeout_s if timeout is None else timeout
        try:
            self._conn.send((method, args))
        except OSError:
            raise RuntimeError(f"the client process is gone (exit code {self.client.exitcode})") from None
        return self._answer(method, timeout)

    def _answer(self, what: str, timeout: float) -> Any:
        """The client process's answer to `what`: what the session raised is raised here; its
        silence for `timeout` seconds or its death raise RuntimeError and stop it, so that no late
        answer passes for the next request's."""
        try:
            answered = self._conn.poll(timeout)
            status, value = self._conn.recv() if answered else ("lost", f"no answer within {timeout:.0f} s")
        except (EOFError, OSError):
            status, value = "lost", "it died"
        if status == "lost":
            self._stop_client()
            raise RuntimeError(f"the client process failed at '{what}': {value} (exit code {self.client.exitcode})")
        if status == "error":
            raise value
        return value

    def _recover(self, reason: str) -> None:
        self._stop_client()
        self.server.restart(reason)
        self._start_client()
        self.broken = False

    # -- the contract ----------------------------------------------------------------------
    def reset(self, seed: int | None) -> tuple[np.ndarray, DrivingState]:
        for attempt in range(RESET_ATTEMPTS):
            if attempt == SAME_SEED_ATTEMPTS and seed is not None:
                seed = other_seed(seed)
                log.warning("CARLA env %d: %d resets failed with the episode's seed; trying seed %d",
                            self.server.slot, attempt, seed)
            try:
                if self.broken:
                    self._recover("the last episode hit a simulator failure")
                elif self.cfg.launch and self.cfg.restart_every_episodes and self.episodes \
                        and self.episodes % self.cfg.restart_every_episodes == 0:
                    self._recover(f"scheduled restart after {self.episodes} episodes")
                observation = self._request("reset", seed, timeout=self.cfg.setup_timeout_s)
                self.episodes += 1
                return observation
            except RuntimeError as exc:
                self.broken = True
                if attempt == RESET_ATTEMPTS - 1:
                    raise SimulatorFailure(f"CARLA env {self.server.slot} at {self.server.address}: "
                                           f"{RESET_ATTEMPTS} resets failed, the last with: {exc}") from exc
                log.warning("CARLA env %d: reset failed (%s); recovering", self.server.slot, exc)
        raise AssertionError("unreachable")

    def _in_episode(self, method: str, *args: Any) -> Any:
        """A request mid-episode: its failure loses the episode, and the next reset relaunches."""
        try:
            return self._request(method, *args)
        except RuntimeError as exc:
            self.broken = True
            raise SimulatorFailure(f"CARLA env {self.server.slot} at {self.server.address}: {exc}") from exc

    def step(self, action: np.ndarray) -> tuple[np.ndarray, DrivingState]:
        return self._in_episode("step", action)

    def surroundings(self) -> Surroundings:
        return self._in_episode("surroundings")

    def render_rgb(self) -> np.ndarray:
        return self._in_episode("render_rgb")

    def metrics(self) -> dict[str, float]:
        session = {"carla_tick_ms": 0.0, "npc_spawn_failures": 0.0}
        if not self.broken:
            try:
                session = self._request("metrics")
            except RuntimeError:
                self.broken = True  # the next reset relaunches
        self.npc_spawn_failures += session["npc_spawn_failures"]
        return {"carla_restarts": float(self.server.restarts), "carla_tick_ms": session["carla_tick_ms"],
                "npc_spawn_failures": self.npc_spawn_failures}

    def close(self) -> None:
        """Has the session clean up while its server answers, then stops the client process and
        a launched server."""
        try:
            if not self.broken:
                self._request("close")
        except RuntimeError as exc:
            log.warning("CARLA env %d: cleanup on close failed: %s", self.server.slot, exc)
        finally:
            self._stop_client()
            self.server.kill()


def _check(cfg: Config) -> None:
    try:
        importlib.import_module("carla")
    except ImportError as exc:
        raise ConfigError(f"env.backend=carla needs the 'carla' 0.9.16 client package "
                          f"(wheels for Python 3.10-3.12): {exc}") from exc
    if cfg.carla.route_file:
        load_route_file(cfg.carla.route_file, cfg.env.route_length_m)


SPEC = register(BackendSpec(
    name="carla",
    make=lambda cfg, slot, training: CarlaBackend(cfg.env, cfg.carla, slot),
    step_seconds=lambda cfg: 1.0 / CARLA_FPS,
    max_steer_rad=math.radians(70.0),  # the Tesla Model 3's front wheels
    config_section="carla",
    metrics={"actors/carla_restarts": "sum", "actors/npc_spawn_failures": "sum", "actors/carla_tick_ms": "mean"},
    check=_check,
    # A launched server busy-waits for the next tick in synchronous mode: a core of its own.
    server_cpus=lambda cfg: float(max(cfg.carla.server_cpus, 1)) if cfg.carla.launch else 0.0,
))
