"""Test double of the `carla` 0.9.16 client module, limited to the calls our backend makes.

`tests/test_carla.py` checks that every public class, method and attribute here exists in the real
package (and that keyword parameters carry the real names), so the backend cannot come to depend
on something CARLA lacks.

The server side is a stand-in process (`tests/carla_double/fake_server.py`) that only answers
version queries and ticks over TCP, so hangs and crashes are real: a tick on a hung stand-in
times out, one on a dead stand-in is refused. The world itself is simulated here, in the client
process: a circular road of radius 80 m (lane width 3.5 m, one driving lane either side: the inner one
goes our way, the outer one is oncoming), a
kinematic ego vehicle, NPCs circling at 6 m/s, and sensors that report on every tick. The camera
paints each image with the value (frame * 7) % 256 so tests can tell which frame an observation
came from, and `World._stale_images` makes it deliver the previous frame's image first.

The event sensors report as CARLA 0.9.16's do. The lane-invasion sensor (computed in libcarla,
client/LaneInvasionSensor.cpp) moves the four corners of the parent's bounding box from the last
tick's pose to this one's and sends one event per tick in which any corner crossed a marking, so
one lane change gives up to four events on different ticks. The collision sensor (server side,
Sensor/CollisionSensor.cpp) sends one event per other actor per tick, again on every tick the
contact lasts; level geometry is a stand-in actor of id 0 whose type_id is "static." plus its
semantic tag, as the curb does here ("static.sidewalk", touched by a corner past the road edge).
`World._event_delay_s` delivers a tick's events on another thread that long after `tick()`
returned, as libcarla may: it wakes the waiting tick before it runs the on-tick callbacks, and
collision data comes on a stream of its own.

Traffic Managers live as in libcarla 0.9.16: one map per process keyed by port (`_tm_map`, the
static `TrafficManager::_tm_map`), shared by every client. `get_trafficmanager(port)` returns the
entry already under that port, bound to the server incarnation that created it, and creates one
(listening on the port) only for a port without one. Each synchronous entry runs a control cycle,
which sends a batch to its own server, on every `World.tick()` and `apply_settings()` of any world
in the process (libcarla's `SynchronizeFrame` calls the static `TrafficManager::Tick()`), once more
when shut down or switched to asynchronous mode (its worker is woken and completes a cycle), and on
a map load in any client, which also makes every entry forget its vehicles
(`TrafficManager::Reset()`). An asynchronous entry's worker loops on its own, asking its server for
the episode settings each time round; here it does so once per tick of any world. A call of an
entry's worker to a dead or hung server raises `_Terminate`: the real one throws in the Traffic
Manager's thread, where nothing catches it, and the process aborts. `shut_down()` removes the
port's entry; handles to the port then do nothing. NPCs move only while an entry of their world
drives them.
"""

from __future__ import annotations

import fnmatch
import math
import os
import socket
import threading
from typing import Any, Callable

from . import command

_ROAD_RADIUS = 80.0
_LANE_WIDTH = 3.5
_ROAD_HALF_WIDTH = 1.5 * _LANE_WIDTH  # our lane plus one driving lane either side
_WHEELBASE = 2.9
_NPC_SPEED = 6.0
_HALF_LENGTH, _HALF_WIDTH = 2.4, 1.0  # a car's bounding-box extent


def _timeout_error(seconds: float, address: str) -> RuntimeError:
    return RuntimeError(f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, "
                        f"make sure the simulator is ready and connected to {address}")


# -- geometry ----------------------------------------------------------------------------------
class Vector3D:
    x: float
    y: float
    z: float

    def __init__(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self.x, self.y, self.z = x, y, z


class Location(Vector3D):
    def distance(self, location: "Location") -> float:
        return math.dist((self.x, self.y, self.z), (location.x, location.y, location.z))


class Rotation:
    pitch: float
    yaw: float
    roll: float

    def __init__(self, pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> None:
        self.pitch, self.yaw, self.roll = pitch, yaw, roll


class Transform:
    location: Location
    rotation: Rotation

    def __init__(self, location: Location | None = None, rotation: Rotation | None = None) -> None:
        self.location = location or Location()
        self.rotation = rotation or Rotation()

    def get_forward_vector(self) -> Vector3D:
        yaw = math.radians(self.rotation.yaw)
        return Vector3D(math.cos(yaw), math.sin(yaw), 0.0)


class LaneType:
    Driving = 2
    Any = -2


class VehicleControl:
    throttle: float
    steer: float
    brake: float

    def __init__(self, throttle: float = 0.0, steer: float = 0.0, brake: float = 0.0) -> None:
        self.throttle, self.steer, self.brake = throttle, steer, brake


class WorldSettings:
    synchronous_mode: bool
    fixed_delta_seconds: float | None

    def __init__(self) -> None:
        self.synchronous_mode = False
        self.fixed_delta_seconds = None


# -- the map -----------------------------------------------------------------------------------
def _on_circle(theta: float, z: float = 0.0) -> Transform:
    return Transform(Location(_ROAD_RADIUS * math.cos(theta), _ROAD_RADIUS * math.sin(theta), z),
                     Rotation(yaw=math.degrees(theta) + 90.0))


class Waypoint:
    """A point on the centre of lane `lane` of the circular road: -1 the inner lane (our direction,
    right of the route's lane), 0 the route's lane, 1 the outer lane, oncoming (right-hand traffic,
    as in Town01: OpenDRIVE gives it a lane_id of the other sign and points it the other way)."""

    transform: Transform
    lane_width: float
    lane_id: int
    lane_type: int
    is_junction: bool

    def __init__(self, theta: float, lane: int = 0) -> None:
        self._theta, self._lane = theta, lane
        radius = _ROAD_RADIUS + lane * _LANE_WIDTH
        self.transform = Transform(Location(radius * math.cos(theta), radius * math.sin(theta), 0.0),
                                   Rotation(yaw=math.degrees(theta) + (270.0 if lane == 1 else 90.0)))
        self.lane_width = _LANE_WIDTH
        self.lane_id = {-1: -2, 0: -1, 1: 1}[lane]
        self.lane_type = LaneType.Driving
        self.is_junction = False

    def next(self, distance: float) -> list["Waypoint"]:
        turn = distance / (_ROAD_RADIUS + self._lane * _LANE_WIDTH)
        return [Waypoint(self._theta + (-turn if self._lane == 1 else turn), self._lane)]

    def get_left_lane(self) -> "Waypoint | None":
        """The lane on this lane's left, seen in its own direction (the outer lane's is the route's lane)."""
        return Waypoint(self._theta, {-1: 0, 0: 1, 1: 0}[self._lane])

    def get_right_lane(self) -> "Waypoint | None":
        return Waypoint(self._theta, -1) if self._lane == 0 else None


class Map:
    name: str

    def __init__(self, name: str) -> None:
        self.name = f"Carla/Maps/{name}"

    def get_spawn_points(self) -> list[Transform]:
        return [_on_circle(2 * math.pi * k / 16, 0.5) for k in range(16)]

    def get_waypoint(self, location: Location, project_to_road: bool = True, lane_type: int = LaneType.Driving) -> Waypoint | None:
        offset = math.hypot(location.x, location.y) - _ROAD_RADIUS
        if not project_to_road and abs(offset) > _ROAD_HALF_WIDTH:
            return None
        return Waypoint(math.atan2(location.y, location.x), max(-1, min(1, round(offset / _LANE_WIDTH))))


# -- actors ------------------------------------------------------------------------------------
class ActorAttribute:
    id: str

    def __init__(self, id: str, value: str) -> None:
        self.id = id
        self._value = value

    def as_str(self) -> str:
        return self._value


# A vehicle blueprint's base_type in CARLA 0.9.16 (car, truck, van, motorcycle, bicycle): the
# library mixes them, so `filter("vehicle.*")` alone also draws bikes and trucks as traffic.
_BASE_TYPES = {
    "vehicle.tesla.model3": "car", "vehicle.audi.tt": "car", "vehicle.lincoln.mkz_2020": "car",
    "vehicle.carlamotors.carlacola": "truck", "vehicle.kawasaki.ninja": "motorcycle", "vehicle.bh.crossbike": "bicycle",
}


class ActorBlueprint:
    id: str

    def __init__(self, id: str) -> None:
        self.id = id
        # Every vehicle blueprint carries base_type and a role_name (the Traffic Manager's hybrid
        # physics centres on the vehicle whose role_name is "hero").
        self._attributes: dict[str, str] = (
            {"base_type": _BASE_TYPES[id], "role_name": "autopilot"} if id.startswith("vehicle.") else {}
        )

    def has_attribute(self, id: str) -> bool:
        return id in self._attributes

    def get_attribute(self, id: str) -> ActorAttribute:
        if id not in self._attributes:
            raise IndexError(f"attribute '{id}' not found in blueprint '{self.id}'")
        return ActorAttribute(id, self._attributes[id])

    def set_attribute(self, id: str, value: str) -> None:
        self._attributes[id] = value


class BlueprintLibrary:
    def __init__(self, ids: list[str]) -> None:
        self._blueprints = [ActorBlueprint(i) for i in ids]

    def find(self, id: str) -> ActorBlueprint:
        for bp in self._blueprints:
            if bp.id == id:
                return ActorBlueprint(id)
        raise IndexError(f"blueprint '{id}' not found")

    def filter(self, wildcard_pattern: str) -> "BlueprintLibrary":
        prefix = wildcard_pattern.rstrip("*")
        return BlueprintLibrary([bp.id for bp in self._blueprints if bp.id.startswith(prefix)])

    def __len__(self) -> int:
        return len(self._blueprints)

    def __getitem__(self, pos: int) -> ActorBlueprint:
        return self._blueprints[pos]


class Actor:
    id: int

    def __init__(self, world: "World", id: int, blueprint: ActorBlueprint, transform: Transform) -> None:
        self.id = id
        self._world = world
        self._type = blueprint.id
        self._attributes = dict(blueprint._attributes)
        self._transform = transform
        self._speed = 0.0
        self._parent: Actor | None = None
        self._born = world._frame

    @property
    def type_id(self) -> str:
        return self._type

    def get_transform(self) -> Transform:
        t = self._transform
        return Transform(Location(t.location.x, t.location.y, t.location.z), Rotation(yaw=t.rotation.yaw))

    def get_velocity(self) -> Vector3D:
        f = self._transform.get_forward_vector()
        return Vector3D(f.x * self._speed, f.y * self._speed, 0.0)


class BoundingBox:
    def __init__(self, location: "Location", extent: Vector3D) -> None:
        self.location = location
        self.extent = extent


class Vehicle(Actor):
    @property
    def bounding_box(self) -> BoundingBox:
        """Relative to the vehicle's origin, as CARLA's (a car's centre here)."""
        return BoundingBox(Location(0.0, 0.0, 0.75), Vector3D(_HALF_LENGTH, _HALF_WIDTH, 0.75))

    def apply_control(self, control: VehicleControl) -> None:
        self._world._controls[self.id] = control


class Sensor(Actor):
    def listen(self, callback: Callable[[Any], Any]) -> None:
        self._world._listeners[self.id] = callback

    def stop(self) -> None:
        self._world._listeners.pop(self.id, None)


class ActorList:
    """The actors of a world when it was asked (`World.get_actors()`)."""

    def __init__(self, actors: list[Actor]) -> None:
        self._actors = actors

    def filter(self, wildcard_pattern: str) -> ActorList:
        """Matched against `type_id` with fnmatch, as the real one does."""
        return ActorList([a for a in self._actors if fnmatch.fnmatchcase(a.type_id, wildcard_pattern)])

    def __iter__(self) -> Any:
        return iter(self._actors)

    def __len__(self) -> int:
        return len(self._actors)

    def __getitem__(self, pos: int) -> Actor:
        return self._actors[pos]


class Image:
    frame: int
    width: int
    height: int
    raw_data: bytes

    def __init__(self, frame: int, width: int, height: int) -> None:
        self.frame, self.width, self.height = frame, width, height
        self.raw_data = bytes([(frame * 7) % 256]) * (width * height * 4)


class CollisionEvent:
    frame: int
    other_actor: Actor

    def __init__(self, frame: int, other_actor: Actor) -> None:
        self.frame, self.other_actor = frame, other_actor


class LaneMarking:
    """A marking a corner crossed; the backend reads none of its fields."""


class LaneInvasionEvent:
    frame: int
    crossed_lane_markings: list[LaneMarking]

    def __init__(self, frame: int, crossed_lane_markings: list[LaneMarking]) -> None:
        self.frame, self.crossed_lane_markings = frame, crossed_lane_markings


class ObstacleDetectionEvent:
    frame: int
    distance: float

    def __init__(self, frame: int, distance: float) -> None:
        self.frame, self.distance = frame, distance


# -- world, traffic manager, client ------------------------------------------------------------
class _Terminate(BaseException):
    """The end of a real client process: a Traffic Manager's thread threw (its server is dead or
    hung) and std::terminate aborted the process. Not an Exception, so no `except RuntimeError`
    of the code under test swallows what no real client survives."""


class _TrafficManagerLocal:
    """The Traffic Manager under one port: bound for life to the server incarnation whose client
    created it (libcarla's TrafficManagerLocal keeps that client's episode), listening on its port
    as the real one's RPC server does until it is shut down."""

    def __init__(self, world_key: tuple[str, int, str], port: int) -> None:
        self.world_key, self.port = world_key, port
        self._listener = socket.create_server(("0.0.0.0", port))
        self.synchronous = False
        self.hybrid: tuple[bool, float] = (False, 70.0)  # (hybrid physics on, radius m)
        self.seed: int | None = None
        self.vehicles: set[int] = set()
        self.cycles = 0

    @property
    def world(self) -> "World":
        return _worlds[self.world_key]

    def work(self) -> None:
        """One round of its worker, which calls its own server: a synchronous one's control cycle
        also drives its vehicles still in its world."""
        world = self.world
        try:
            world._conn.call(b"b")
        except RuntimeError as exc:
            raise _Terminate(f"terminate called after throwing an instance of 'carla::client::TimeoutException' "
                             f"in the Traffic Manager of port {self.port}: {exc}") from None
        if self.synchronous:
            self.cycles += 1
            self.vehicles &= world._actors.keys()
            world._autopilot |= self.vehicles

    def reset(self) -> None:
        """libcarla's Reset() on a new episode anywhere in the process: stopped (a last cycle when
        synchronous), its vehicles forgotten, started again."""
        if self.synchronous:
            self.work()
        self.vehicles.clear()


_tm_map: dict[int, _TrafficManagerLocal] = {}
"""Every Traffic Manager of the process by port, whichever client created it."""


def _tick_traffic_managers() -> None:
    for tm in list(_tm_map.values()):
        tm.work()


class TrafficManager:
    """A handle on the entry of `_tm_map` under its port, looked up on every call."""

    def __init__(self, port: int) -> None:
        self._port = port

    def set_synchronous_mode(self, mode_switch: bool = True) -> None:
        if tm := _tm_map.get(self._port):
            if tm.synchronous and not mode_switch:
                tm.work()  # the waiting worker is woken and completes a synchronous cycle
            tm.synchronous = mode_switch

    def set_random_device_seed(self, value: int) -> None:
        if tm := _tm_map.get(self._port):
            tm.seed = value

    def set_hybrid_physics_mode(self, enabled: bool = True) -> None:
        if tm := _tm_map.get(self._port):
            tm.hybrid = (enabled, tm.hybrid[1])

    def set_hybrid_physics_radius(self, r: float = 70.0) -> None:
        if tm := _tm_map.get(self._port):
            tm.hybrid = (tm.hybrid[0], r)

    def shut_down(self) -> None:
        """Removes the port's entry and frees the port, after the last cycle of a synchronous one."""
        if tm := _tm_map.pop(self._port, None):
            tm._listener.close()
            if tm.synchronous:
                tm.work()

    def get_port(self) -> int:
        return self._port


class World:
    """The simulated world of one server incarnation."""

    _stale_images = False
    """Test knob: deliver the previous frame's camera image before the current one."""
    _camera_silent_ticks = 1
    """A camera sends nothing on this many ticks after it is created, as real sensors may not
    (leaderboard#171: no data on the first tick after spawning)."""
    _road_clearance_m = 0.0
    """Test knob: a vehicle spawned less than this above the road surface collides with the road,
    as on a slope or a cambered road of a real town, where a fixed spawn height may not clear it."""
    _event_delay_s = None
    """Test knob: deliver each tick's collision, lane-invasion and obstacle events on another
    thread this long after `tick()` returned, instead of before it returns."""

    def __init__(self, town: str, connection: "_Connection") -> None:
        self._map = Map(town)
        self._conn = connection
        self._settings = WorldSettings()
        self._frame = 1
        self._next_id = 100
        self._actors: dict[int, Actor] = {}
        self._controls: dict[int, VehicleControl] = {}
        self._listeners: dict[int, Callable[[Any], Any]] = {}
        self._autopilot: set[int] = set()  # the vehicles a Traffic Manager drives
        self._last_corners: dict[int, list[float]] = {}  # radial offsets of a parent's corners, by sensor
        self._sidewalk = Actor(self, 0, ActorBlueprint("static.sidewalk"), Transform())

    def get_map(self) -> Map:
        return self._map

    def get_settings(self) -> WorldSettings:
        s = WorldSettings()
        s.synchronous_mode, s.fixed_delta_seconds = self._settings.synchronous_mode, self._settings.fixed_delta_seconds
        return s

    def apply_settings(self, world_settings: WorldSettings) -> int:
        self._settings = world_settings
        _tick_traffic_managers()
        return self._frame

    def get_blueprint_library(self) -> BlueprintLibrary:
        return BlueprintLibrary([*_BASE_TYPES, "sensor.camera.rgb", "sensor.other.collision", "sensor.other.lane_invasion",
                                 "sensor.other.obstacle", "static.prop.streetbarrier"])

    def get_actors(self) -> ActorList:
        return ActorList(list(self._actors.values()))

    def spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None) -> Actor:
        self._conn.call(b"s")
        if attach_to is None and blueprint.id.startswith("vehicle.") and transform.location.z < self._road_clearance_m:
            raise RuntimeError(f"Spawn failed because of collision at spawn position ({blueprint.id})")
        for other in self._actors.values():
            if attach_to is None and other._parent is None and other._transform.location.distance(transform.location) < 2.0:
                raise RuntimeError(f"Spawn failed because of collision at spawn position ({blueprint.id})")
        if attach_to is None and any(self._map.get_spawn_points()[k].location.distance(transform.location) < 2.0
                                     for k in _blocked_spawns()):
            raise RuntimeError(f"Spawn failed because of collision at spawn position ({blueprint.id})")
        kind = Sensor if blueprint.id.startswith("sensor.") else Vehicle if blueprint.id.startswith("vehicle.") else Actor
        actor = kind(self, self._next_id, blueprint, transform)
        actor._parent = attach_to
        self._actors[actor.id] = actor
        self._next_id += 1
        return actor

    def try_spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None) -> Actor | None:
        """`spawn_actor`, but None where it raises: libcarla's TrySpawnActor catches every
        std::exception, a time-out included."""
        try:
            return self.spawn_actor(blueprint, transform, attach_to)
        except RuntimeError:
            return None

    def tick(self, seconds: float = 10.0) -> int:
        self._conn.call(b"t", seconds)
        dt = self._settings.fixed_delta_seconds or 0.05
        self._frame += 1
        for actor in list(self._actors.values()):
            if isinstance(actor, Vehicle):
                self._move(actor, dt)
        events: list[tuple[Callable[[Any], Any], Any]] = []
        for sensor in [a for a in self._actors.values() if isinstance(a, Sensor) and a.id in self._listeners]:
            events += self._sense(sensor)
        if self._event_delay_s is None:
            for callback, event in events:
                callback(event)
        else:
            late = threading.Timer(self._event_delay_s, lambda: [callback(event) for callback, event in events])
            late.daemon = True
            late.start()
        _tick_traffic_managers()
        return self._frame

    # -- simulation ----------------------------------------------------------------------
    def _move(self, vehicle: Vehicle, dt: float) -> None:
        t = vehicle._transform
        if vehicle.id in self._autopilot:
            theta = math.atan2(t.location.y, t.location.x) + _NPC_SPEED * dt / _ROAD_RADIUS
            vehicle._transform, vehicle._speed = _on_circle(theta, t.location.z), _NPC_SPEED
            return
        c = self._controls.get(vehicle.id, VehicleControl())
        vehicle._speed = max(vehicle._speed + (4.0 * c.throttle - 8.0 * c.brake) * dt, 0.0)
        yaw = math.radians(t.rotation.yaw) + vehicle._speed / _WHEELBASE * math.tan(math.radians(70.0) * c.steer) * dt
        t.rotation.yaw = math.degrees(yaw)
        t.location.x += vehicle._speed * math.cos(yaw) * dt
        t.location.y += vehicle._speed * math.sin(yaw) * dt

    def _corner_offsets(self, vehicle: Actor) -> list[float]:
        """How far each corner of the vehicle's bounding box is outside the road's centre circle."""
        t = vehicle._transform
        yaw = math.radians(t.rotation.yaw)
        c, s = math.cos(yaw), math.sin(yaw)
        return [math.hypot(t.location.x + c * dx - s * dy, t.location.y + s * dx + c * dy) - _ROAD_RADIUS
                for dx in (_HALF_LENGTH, -_HALF_LENGTH) for dy in (_HALF_WIDTH, -_HALF_WIDTH)]

    def _sense(self, sensor: Sensor) -> list[tuple[Callable[[Any], Any], Any]]:
        """The events `sensor` reports this tick, with the callback for each; the camera's images
        go out on a thread of their own at once."""
        parent, callback, frame = sensor._parent, self._listeners[sensor.id], self._frame
        if parent is None:
            return []
        loc = parent._transform.location
        others = [a for a in self._actors.values() if isinstance(a, Vehicle) and a is not parent]
        if sensor._type == "sensor.camera.rgb":
            if frame - sensor._born <= self._camera_silent_ticks:
                return []
            w, h = int(sensor._attributes.get("image_size_x", 800)), int(sensor._attributes.get("image_size_y", 600))
            images = ([Image(frame - 1, w, h)] if self._stale_images else []) + [Image(frame, w, h)]
            # Camera data arrives on another thread, as from CARLA's streaming port.
            threading.Thread(target=lambda: [callback(i) for i in images], daemon=True).start()
            return []
        if sensor._type == "sensor.other.collision":
            props = [a for a in self._actors.values() if type(a) is Actor]
            hit = [o for o in others + props if o._transform.location.distance(loc) < 3.0]
            if any(abs(offset) > _ROAD_HALF_WIDTH for offset in self._corner_offsets(parent)):
                hit.append(self._sidewalk)
            return [(callback, CollisionEvent(frame, other)) for other in hit]
        if sensor._type == "sensor.other.lane_invasion":
            corners = self._corner_offsets(parent)
            before = self._last_corners.get(sensor.id, corners)
            self._last_corners[sensor.id] = corners
            crossed = [LaneMarking() for b, a in zip(before, corners) for marking in (-_LANE_WIDTH / 2, _LANE_WIDTH / 2)
                       if (b - marking) * (a - marking) < 0]
            return [(callback, LaneInvasionEvent(frame, crossed))] if crossed else []
        if sensor._type == "sensor.other.obstacle":
            # ObstacleDetectionSensor.cpp: one sweep ahead per tick of a sphere of hit_radius
            # (default 0.5 m) from the sensor's own location, its first hit, any actor's geometry
            # (props, walls, poles) unless only_dynamics (default false) limits it to vehicles and
            # walkers; the distance is how far the sphere's centre went (HitOut.Distance)
            fwd = parent._transform.get_forward_vector()
            mount = sensor._transform.location.x
            start_x, start_y = loc.x + mount * fwd.x, loc.y + mount * fwd.y
            radius = float(sensor._attributes.get("hit_radius", 0.5))
            dynamic_only = sensor._attributes.get("only_dynamics", "false").lower() == "true"
            props = [] if dynamic_only else [a for a in self._actors.values() if type(a) is Actor]
            hits = []
            for other in others + props:
                o = other._transform.location
                ahead = (o.x - start_x) * fwd.x + (o.y - start_y) * fwd.y
                side = abs(-(o.x - start_x) * fwd.y + (o.y - start_y) * fwd.x)
                swept = ahead - (_HALF_LENGTH if isinstance(other, Vehicle) else 0.0) - radius
                if 0.0 < swept < float(sensor._attributes.get("distance", 5)) and side < _HALF_WIDTH + radius:
                    hits.append(swept)
            return [(callback, ObstacleDetectionEvent(frame, min(hits)))] if hits else []
        return []

    def _apply(self, cmd: Any) -> command.Response:
        if isinstance(cmd, command.SpawnActor):
            try:
                actor = self.spawn_actor(cmd._blueprint, cmd._transform)
            except RuntimeError as exc:
                return command.Response(0, str(exc))
            return command.Response(actor.id, "")
        if isinstance(cmd, command.DestroyActor):
            key = cmd._actor if isinstance(cmd._actor, int) else cmd._actor.id
            if self._actors.pop(key, None) is None:
                return command.Response(key, f"actor {key} not found")
            self._listeners.pop(key, None)
            self._autopilot.discard(key)
            return command.Response(key, "")
        raise NotImplementedError(type(cmd).__name__)


class _Connection:
    """A TCP link to the stand-in server: one byte out, one line back."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.address = f"{host}:{port}"
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            raise _timeout_error(timeout, self.address) from None

    def call(self, op: bytes, seconds: float | None = None) -> str:
        try:
            self.sock.settimeout(seconds or self.timeout)
            self.sock.sendall(op)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = self.sock.recv(64)
                if not chunk:
                    raise OSError("connection closed")
                reply += chunk
            return reply.decode().strip()
        except OSError:
            raise _timeout_error(seconds or self.timeout, self.address) from None


def _blocked_spawns() -> list[int]:
    """Test knob, read in every process: the spawn points (by index) where something of the map
    stands, so that every spawn there fails (FAKE_CARLA_BLOCKED_SPAWNS='0,3,...')."""
    return [int(k) for k in os.environ.get("FAKE_CARLA_BLOCKED_SPAWNS", "").split(",") if k]


_worlds: dict[tuple[str, int, str], World] = {}
"""Worlds by server incarnation: a relaunched server starts empty, as a real one does."""
_worker_threads: list[int] = []
"""`worker_threads` of every Client made in this process, in order: libcarla's client starts that
many streaming threads, or one per hardware thread for 0 (client/detail/Client.cpp)."""


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self._host, self._port, self._timeout = host, port, 5.0
        _worker_threads.append(worker_threads)
        self._conn: _Connection | None = None

    def _connection(self) -> _Connection:
        if self._conn is None:
            self._conn = _Connection(self._host, self._port, self._timeout)
        return self._conn

    def set_timeout(self, seconds: float) -> None:
        self._timeout = seconds
        if self._conn is not None:  # applies to every later call, as in the real client
            self._conn.timeout = seconds

    def get_server_version(self) -> str:
        return self._connection().call(b"v")

    def _world_key(self) -> tuple[str, int, str]:
        conn = self._connection()
        key = (self._host, self._port, conn.call(b"h"))
        if key not in _worlds:  # the map the server booted
            _worlds[key] = World(conn.call(b"m"), conn)
        _worlds[key]._conn = conn
        return key

    def get_world(self) -> World:
        return _worlds[self._world_key()]

    def load_world(self, map_name: str) -> World:
        conn = self._connection()
        conn.call(b"l", self._timeout)  # blocks while the server loads the map, as the real call does
        world = _worlds[(self._host, self._port, conn.call(b"h"))] = World(map_name, conn)
        for tm in list(_tm_map.values()):  # the new episode resets every Traffic Manager of the process
            tm.reset()
        return world

    def _traffic_manager(self, port: int) -> _TrafficManagerLocal:
        """The entry of `_tm_map` under `port`, created bound to this client's server only if
        there is none."""
        if port not in _tm_map:
            _tm_map[port] = _TrafficManagerLocal(self._world_key(), port)
        return _tm_map[port]

    def get_trafficmanager(self, client_connection: int = 8000) -> TrafficManager:
        self._traffic_manager(client_connection)
        return TrafficManager(client_connection)

    def apply_batch(self, commands: list[Any]) -> None:
        self.apply_batch_sync(commands)

    def apply_batch_sync(self, commands: list[Any], do_tick: bool = False) -> list[command.Response]:
        world = self.get_world()
        responses = [world._apply(c) for c in commands]
        # As libcarla's apply_batch_sync: a vehicle spawned with SetAutopilot is registered with
        # the Traffic Manager that get_trafficmanager(port) would return.
        for cmd, response in zip(commands, responses):
            ports = [c._port for c in getattr(cmd, "_then", []) if isinstance(c, command.SetAutopilot) and c._enabled]
            if ports and not response.error:
                self._traffic_manager(ports[-1]).vehicles.add(response.actor_id)
        if do_tick:
            world.tick()
        return responses
