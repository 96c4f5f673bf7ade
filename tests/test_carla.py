"""The CARLA backend and its server lifecycle, without a CARLA server: the `carla` test double
(tests/carla_double/carla), checked here against the real carla 0.9.16 package, and a stand-in
server process (tests/carla_double/fake_server.py) that can hang, crash or refuse to start.

The double simulates the world in the client's process, so tests that look into it drive a
`CarlaSession` in their own process (`session_env`); `make_env` runs the client in a child process."""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from actors.actor import Actor
from actors.adder import ChunkAdder
from actors.baseline import baseline_for
from actors.envs import check_backend, make_env
from actors.envs.carla_env import CarlaSession, _offset_from
from actors.envs.carla_server import (
    PORTS_PER_SERVER,
    SLOT_SPAN,
    CarlaServer,
    CarlaUnavailable,
    allocate_ports,
    port_free,
    reap_orphans,
)
from actors.runner import EpisodeRunner
from common.config import CarlaConfig, ConfigError, load_config
from common.driving import decode_lookahead
from common.env import DrivingEnv, SimulatorFailure
from replay_server.server import free_port

DOUBLE_ROOT = Path(__file__).parent / "carla_double"
FAKE_SERVER = DOUBLE_ROOT / "fake_server.py"


# -- the double against the real package ---------------------------------------------------------
def _stub_classes(pyi: Path) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.parse(pyi.read_text()).body if isinstance(n, ast.ClassDef)}


def _stub_params(classes: dict[str, ast.ClassDef], cls: str, method: str) -> set[str] | None:
    """Parameter names of every overload of `cls.method` in the stubs, looking through base classes."""
    node = classes.get(cls)
    if node is None:
        return None
    names = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == method:
            a = item.args
            names |= {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs}
    if names:
        return names
    for base in node.bases:
        found = _stub_params(classes, base.id if isinstance(base, ast.Name) else "", method)
        if found:
            return found
    return None


def test_double_matches_real_carla_package():
    """Every class, method and attribute of the double exists in carla 0.9.16, and every
    parameter the backend may pass by keyword has the real name."""
    for name in [m for m in sys.modules if m == "carla" or m.startswith("carla.")]:
        del sys.modules[name]
    real = importlib.import_module("carla")
    assert "site-packages" in real.__file__, real.__file__
    stubs_dir = Path(real.__file__).parent
    spec = importlib.util.spec_from_file_location("carla_double", DOUBLE_ROOT / "carla" / "__init__.py",
                                                  submodule_search_locations=[str(DOUBLE_ROOT / "carla")])
    double = importlib.util.module_from_spec(spec)
    sys.modules["carla_double"] = double
    try:
        spec.loader.exec_module(double)
        pairs = [(double, real, _stub_classes(stubs_dir / "libcarla.pyi")),
                 (importlib.import_module("carla_double.command"), real.command, _stub_classes(stubs_dir / "command.pyi"))]
    finally:
        del sys.modules["carla_double"]
    missing, renamed, checked = [], [], 0
    for fake, module, stubs in pairs:
        for name, obj in vars(fake).items():
            if name.startswith("_") or inspect.ismodule(obj) or getattr(obj, "__module__", fake.__name__) != fake.__name__:
                continue
            checked += 1
            if not hasattr(module, name):
                missing.append(f"{module.__name__}.{name}")
                continue
            if not inspect.isclass(obj):
                continue
            members = set(getattr(obj, "__annotations__", {})) | {
                k for k in vars(obj) if not k.startswith("_") or k in ("__len__", "__getitem__")}
            for attr in sorted(members):
                checked += 1
                if not hasattr(getattr(module, name), attr):
                    missing.append(f"{module.__name__}.{name}.{attr}")
                    continue
                fn = vars(obj).get(attr)
                if inspect.isfunction(fn):
                    params = _stub_params(stubs, name, attr)
                    keywords = [p.name for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]
                    renamed += [f"{name}.{attr}({k}=)" for k in keywords if params is not None and k not in params]
    assert not missing, f"the double has what carla 0.9.16 lacks: {missing}"
    assert not renamed, f"keyword parameters not named as in carla 0.9.16: {renamed}"
    assert checked > 60


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def carla_double(monkeypatch):
    """The double imported as `carla` for the test, the real package (if loaded) restored after."""
    for name in [m for m in sys.modules if m == "carla" or m.startswith("carla.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(DOUBLE_ROOT))
    carla = importlib.import_module("carla")
    assert Path(carla.__file__).parent.parent == DOUBLE_ROOT
    yield carla
    for name in [m for m in sys.modules if m == "carla" or m.startswith("carla.")]:
        del sys.modules[name]


def _free_base(count: int) -> int:
    """A base port with `count` free ports after it (probed, then released)."""
    for _ in range(50):
        base = free_port()
        if base + count < 65000 and all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def carla_config(tmp_path, *extra):
    return load_config(overrides=[
        "env.backend=carla", f"carla.server_command={sys.executable} {FAKE_SERVER}",
        f"carla.port={_free_base(12)}", f"carla.tm_port={_free_base(4)}", f"carla.log_dir={tmp_path / 'carla'}",
        "carla.timeout_s=1.0", "carla.start_timeout_s=10", "carla.traffic=[3,5,8]", "env.route_length_m=60",
        "env.max_episode_steps=400", *extra,
    ])


class LocalSession(CarlaSession):
    """A `CarlaSession` in the test's process on a server of its own, stopped by `close()`."""

    def __init__(self, cfg) -> None:
        self.server = CarlaServer(cfg.carla, 0)
        self.server.start()
        try:
            super().__init__(cfg.env, cfg.carla, self.server.ports)
        except BaseException:
            self.server.kill()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.server.kill()


def session_env(cfg) -> DrivingEnv:
    return DrivingEnv(LocalSession(cfg), cfg.env)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _child_pid(log: Path) -> int:
    return int([line for line in log.read_text().splitlines() if line.startswith("child pid")][-1].split()[-1])


# -- episodes against the double -----------------------------------------------------------------
def test_episode_follows_route_with_the_baseline(tmp_path, carla_double):
    cfg = carla_config(tmp_path)
    env = session_env(cfg)
    try:
        obs, _ = env.reset(seed=3)
        world = env.backend.world
        assert world.get_settings().synchronous_mode and world.get_settings().fixed_delta_seconds == 0.05
        tm = carla_double._tm_map[env.backend.ports.tm]
        assert tm.synchronous and tm.world is world
        assert obs["image"].shape == (4, 84, 84) and obs["image"].dtype == np.uint8
        assert np.all(obs["image"][-1] == (world._frame * 7) % 256)  # the frame of this very tick
        look = decode_lookahead(obs["vector"], cfg.env)
        assert look[-1, 0] > 40.0, "look-ahead points must not be zero (the old waypoint-index bug)"
        policy = baseline_for(cfg, env.backend.dt)
        policy.reset()
        reasons, offsets, total = None, [], 0.0
        for _ in range(400):
            obs, reward, terminated, truncated, info = env.step(policy(obs))
            assert np.all(obs["image"][-1] == (world._frame * 7) % 256)
            offsets.append(obs["vector"][1] * 3.5)
            total += reward
            if terminated or truncated:
                reasons = info["termination"]
                break
        assert reasons in ("route_completed", "collision"), reasons
        assert max(abs(o) for o in offsets) < 1.0, "the baseline keeps to the route centre"
        assert info["progress"] > 30.0
        assert env.backend.metrics()["carla_tick_ms"] > 0.0
    finally:
        env.close()


def test_stale_camera_images_are_skipped(tmp_path, carla_double, monkeypatch):
    monkeypatch.setattr(carla_double.World, "_stale_images", True)
    env = session_env(carla_config(tmp_path))
    try:
        env.reset(seed=0)
        for _ in range(5):
            obs, *_ = env.step(np.array([0.0, 0.5], np.float32))
            assert np.all(obs["image"][-1] == (env.backend.world._frame * 7) % 256)
    finally:
        env.close()


def test_reset_and_close_clean_up_everything(tmp_path, carla_double):
    env = session_env(carla_config(tmp_path, "env.scenario=1"))
    backend = env.backend
    env.reset(seed=1)
    world = backend.world
    first = set(world._actors)
    assert len(first) == 1 + 4 + 5  # ego, 4 sensors, scenario 1's NPCs
    assert len(world._autopilot) == 5
    env.reset(seed=2)
    assert not first & set(world._actors) and len(world._actors) == 10
    env.close()
    assert world._actors == {} and world._listeners == {}
    assert not world.get_settings().synchronous_mode
    assert backend.ports.tm not in carla_double._tm_map and port_free(backend.ports.tm), \
        "the Traffic Manager is shut down, its port free"


def test_traffic_is_cars_the_ego_is_the_hero_and_big_fleets_run_hybrid_physics(tmp_path, carla_double, caplog):
    env = session_env(carla_config(tmp_path, "env.scenario=2", "carla.traffic=[3,5,30]", "carla.hybrid_physics_from=20"))
    backend = env.backend
    try:
        env.reset(seed=3)
        world = backend.world
        npcs = [world._actors[i] for i in backend._npcs]
        # No bicycles, motorbikes or trucks in the traffic, though the library holds them.
        assert npcs and all(a._attributes["base_type"] == "car" for a in npcs)
        assert {bp.get_attribute("base_type").as_str() for bp in world.get_blueprint_library().filter("vehicle.*")} > {"car"}
        assert backend._ego._attributes["role_name"] == "hero"
        assert carla_double._tm_map[backend.ports.tm].hybrid == (True, 70.0)  # 30 NPCs >= 20
        # The track has 16 spawn points: the NPCs that did not fit are counted and logged, not hidden.
        assert backend.metrics()["npc_spawn_failures"] == 30 - len(npcs) > 0
        assert "NPC vehicles not spawned" in caplog.text
    finally:
        env.close()
    small = session_env(carla_config(tmp_path, "env.scenario=0", "carla.hybrid_physics_from=20"))
    try:
        assert carla_double._tm_map[small.backend.ports.tm].hybrid[0] is False  # 3 NPCs: full physics
    finally:
        small.close()


def test_the_shipped_configs_run_hybrid_physics_for_the_big_fleets_only(tmp_path, carla_double):
    """With the shipped traffic and threshold (the built-in default and deploy/configs/carla.yaml,
    no override), the 50- and 100-vehicle scenarios run hybrid physics, the 20-vehicle one does not."""
    shipped = [load_config(), load_config(Path(__file__).parents[1] / "deploy/configs/carla.yaml")]
    assert {(tuple(c.carla.traffic), c.carla.hybrid_physics_from) for c in shipped} == {((20, 50, 100), 50)}
    for scenario, hybrid in enumerate([False, True, True]):
        env = session_env(carla_config(tmp_path, f"env.scenario={scenario}", "carla.traffic=[20,50,100]"))
        try:
            assert carla_double._tm_map[env.backend.ports.tm].hybrid == (hybrid, 70.0), scenario
        finally:
            env.close()


def test_a_server_without_car_blueprints_is_a_clear_error(tmp_path, carla_double, monkeypatch):
    """Blueprints without base_type leave no car for the traffic: a ConfigError naming the problem
    at connect, not an IndexError/ValueError at the first reset, nor a RuntimeError, which the
    backend takes for a server failure and answers with relaunches of a server that cannot do
    better. A scenario without traffic needs no cars."""
    has_attribute = carla_double.ActorBlueprint.has_attribute
    monkeypatch.setattr(carla_double.ActorBlueprint, "has_attribute", lambda bp, id: id != "base_type" and has_attribute(bp, id))
    problem = r"carla.traffic asks for 3 NPC vehicles \(scenario 0\).*no vehicle blueprint with base_type 'car'"
    with pytest.raises(ConfigError, match=problem):
        session_env(carla_config(tmp_path))
    assert not issubclass(ConfigError, RuntimeError)
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,5,8]"))
    try:
        env.reset(seed=0)
    finally:
        env.close()


def test_a_launched_server_boots_the_town_instead_of_loading_it(tmp_path, carla_double, monkeypatch):
    """The town goes on the server's command line, right after the program (where UE4 reads the
    map to boot), so a launched server does not boot the default town (Town10HD_Opt) and then
    load another one."""
    loads = []
    load_world = carla_double.Client.load_world
    monkeypatch.setattr(carla_double.Client, "load_world", lambda self, *a, **k: loads.append(a) or load_world(self, *a, **k))
    env = session_env(carla_config(tmp_path, "carla.town=Town02"))
    try:
        command = env.backend.server.command()
        assert command[:3] == [sys.executable, str(FAKE_SERVER), "/Game/Carla/Maps/Town02"], command
        assert env.backend.map.name == "Carla/Maps/Town02" and loads == []
        env.reset(seed=0)
    finally:
        env.close()


def test_map_loading_gets_the_setup_timeout_and_ticks_the_short_one(tmp_path, carla_double, monkeypatch):
    """A cold server loads its map for minutes: that must not count as a hung server, while a
    tick slower than carla.timeout_s still does. Launched servers get the quality flag. (These
    servers boot another town, the first on their command line, so the session loads Town01.)"""
    monkeypatch.setenv("FAKE_CARLA_LOAD_S", "1.5")
    other_town = f"carla.server_command={sys.executable} {FAKE_SERVER} /Game/Carla/Maps/Town10HD_Opt"
    env = session_env(carla_config(tmp_path, other_town, "carla.setup_timeout_s=10", "carla.quality_level=Low"))  # ticks: 1 s
    try:
        env.reset(seed=1)
        assert env.backend.client._conn.timeout == 1.0
        assert "-quality-level=Low" in env.backend.server.command()
    finally:
        env.close()
    cfg = carla_config(tmp_path, other_town, "carla.setup_timeout_s=1.0")
    with pytest.raises(RuntimeError, match="time-out|timed out"):
        make_env(cfg)  # the client process's error, raised here
    assert port_free(cfg.carla.port), "the server launched for it is stopped"


def test_clients_start_few_streaming_threads(tmp_path, carla_double):
    """libcarla's default (0) starts a streaming thread per hardware thread in every client: the
    server's readiness probe and the session's client both ask for `carla.client_worker_threads`."""
    assert load_config().carla.client_worker_threads > 0
    env = session_env(carla_config(tmp_path, "carla.client_worker_threads=3"))
    env.close()
    assert len(carla_double._worker_threads) >= 2 and set(carla_double._worker_threads) == {3}


def test_a_camera_silent_on_its_first_ticks_is_no_server_failure(tmp_path, carla_double, monkeypatch):
    """Sensors may send nothing on the first ticks after they are created (leaderboard#171): the
    env settles for `carla.settle_ticks` before its first observation instead of relaunching."""
    monkeypatch.setattr(carla_double.World, "_camera_silent_ticks", 2)
    env = session_env(carla_config(tmp_path, "carla.settle_ticks=3"))
    try:
        obs, _ = env.reset(seed=1)  # a session raises where the backend would relaunch
        env.step(np.array([0.0, 0.5], np.float32))
        assert obs["image"].shape == (4, 84, 84)
    finally:
        env.close()


@pytest.mark.parametrize("lane_change, steer, ends, beyond", [
    ("true", 0.3, "off_road", -4.5),  # the inner lane goes our way: legal, until the road's edge
    ("true", -0.3, "off_road", 1.5),  # the outer lane is oncoming: off the route's carriageway
    ("false", 0.3, "lane_departure", -2.5),  # the route is one lane: leaving it ends the episode
])
def test_lateral_offset_is_signed_and_lane_invasion_counted_once(tmp_path, carla_double, lane_change, steer, ends, beyond):
    """The route is the road (env.lane_change): the next lane our way is legal, the oncoming lane and
    leaving the road end the episode; with lane_change off, leaving the route's lane does."""
    env = make_env(carla_config(tmp_path, "carla.traffic=[0,0,0]", f"env.lane_change={lane_change}"))
    try:
        env.reset(seed=0)
        invasions, info, offset = 0, {}, 0.0
        for _ in range(200):  # steer until the episode ends (negative: left)
            obs, _, terminated, _, info = env.step(np.array([steer, 0.3], np.float32))
            invasions += info["lane_invasion"]
            offset = obs["vector"][1] * 3.5
            if terminated:
                break
        assert info["termination"] == ends
        assert (offset > beyond) if beyond > 0 else (offset < beyond), "left of the route is a positive offset"
        assert invasions == 1
        assert info["rewards"]["safety"] <= 0
    finally:
        env.close()


def test_the_lane_offset_is_from_the_centre_of_the_waypoints_lane(carla_double):
    """The map's waypoint sits on its lane's centre: the offset from it is 0 there and one lane
    width, signed as the route's offset (positive left), on the centre of the lane beside it."""
    for theta in (0.3, 2.0, 4.0):
        inner, route = carla_double.Waypoint(theta, -1), carla_double.Waypoint(theta, 0)
        at = [np.array([w.transform.location.x, -w.transform.location.y]) for w in (inner, route)]
        assert _offset_from(inner, at[0]) == pytest.approx(0.0, abs=1e-9)
        assert _offset_from(inner, at[1]) == pytest.approx(3.5)  # the route's lane is left of the inner one
        assert _offset_from(route, at[0]) == pytest.approx(-3.5)


def test_surroundings_report_the_traffic_in_route_coordinates(tmp_path, carla_double):
    env = session_env(carla_config(tmp_path, "env.scenario=1"))
    try:
        env.reset(seed=0)
        for _ in range(3):
            env.step(np.array([0.0, 0.0], np.float32))
        su = env.backend.surroundings()
        assert su.lanes == pytest.approx([-3.5, 0.0], abs=0.05) and su.lane_width == 3.5  # the oncoming lane is not ours
        assert len(su.vehicles) >= 1 and su.vehicles.shape[1] == 4
        assert np.all(np.abs(su.vehicles[:, 1]) < 0.5), "the NPCs circle on the route's lane"
        assert np.allclose(su.vehicles[:, 2], 6.0, atol=0.1) and np.allclose(su.vehicles[:, 3], 0.0, atol=0.1)
    finally:
        env.close()


def _park_ahead(env, carla, metres: float) -> None:
    """A car parked (not on autopilot) `metres` ahead of the ego, in its lane."""
    backend = env.backend
    ego_tf = backend._ego.get_transform()
    fwd = ego_tf.get_forward_vector()
    at = carla.Transform(carla.Location(ego_tf.location.x + metres * fwd.x, ego_tf.location.y + metres * fwd.y, 0.5),
                         ego_tf.rotation)
    backend.world.spawn_actor(backend.blueprints.find("vehicle.audi.tt"), at)


def test_collision_with_obstacle_seen_first(tmp_path, carla_double):
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    try:
        env.reset(seed=0)
        _park_ahead(env, carla_double, 15.0)
        seen, info = [], {}
        for _ in range(100):
            _, _, terminated, _, info = env.step(np.array([0.0, 1.0], np.float32))
            seen.append(info["obstacle_distance"])
            if terminated:
                break
        assert info["termination"] == "collision" and info["collision_kind"] == "rear_end"
        assert info["rewards"]["safety"] < -5
        assert any(math.isfinite(d) and d < 20 for d in seen)
    finally:
        env.close()


def test_emergency_braking_stops_the_ego_short_of_a_parked_car(tmp_path, carla_double):
    """The test above with env.aeb_gap_m: the same rule as on the embedded simulator, on the
    obstacle sensor's distance, stops the full-throttle ego before the parked car."""
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]", "env.aeb_gap_m=2"))
    try:
        env.reset(seed=0)
        _park_ahead(env, carla_double, 15.0)
        braked, info = 0, {}
        for _ in range(100):
            _, _, terminated, _, info = env.step(np.array([0.0, 1.0], np.float32))
            braked += info["aeb"]
            assert not terminated, info["termination"]
            if braked and info["speed"] < 0.5:
                break
        assert braked and info["speed"] < 0.5 and 0 < info["obstacle_distance"] < 10
    finally:
        env.close()


def test_traffic_features_show_a_parked_car_ahead_in_the_egos_lane(tmp_path, carla_double):
    """env.traffic_features on CARLA: the same rows as on the embedded simulator, from the actors'
    transforms and velocities."""
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]", "env.traffic_features=2"))
    try:
        env.reset(seed=0)
        _park_ahead(env, carla_double, 15.0)
        obs, _, _, _, info = env.step(np.array([0.0, 0.0], np.float32))
        assert obs["vector"].shape == (63,)
        (present, ahead, beside, relative, lateral), empty = obs["vector"][53:].reshape(2, 5)
        (parked,) = env.backend.surroundings().vehicles
        assert present == 1 and ahead * 40 == pytest.approx(parked[0], abs=1e-3) == pytest.approx(15.0, abs=0.5)
        assert beside * 3.5 == pytest.approx(parked[1] - obs["vector"][1] * 3.5, abs=1e-3)
        assert abs(beside * 3.5) < 1.75  # in the ego's lane (the road curves: off its straight-ahead line)
        assert relative * 30 == pytest.approx(-info["speed"], abs=0.1) and lateral == pytest.approx(0.0, abs=0.01)
        assert np.all(empty == 0)
    finally:
        env.close()


def _place(carla, ego, offset: float, tilt: float = 0.0) -> None:
    """Stands the ego still, `offset` m outside the road's centre line where it is, turned `tilt`
    degrees off the road's direction."""
    loc = ego._transform.location
    phi = math.atan2(loc.y, loc.x)
    r = 80.0 + offset
    ego._transform = carla.Transform(carla.Location(r * math.cos(phi), r * math.sin(phi), loc.z),
                                     carla.Rotation(yaw=math.degrees(phi) + 90.0 + tilt))
    ego._speed = 0.0


def _recorded(backend, sensor_type: str) -> list:
    """The events the double sends to the session's `sensor_type` sensor, recorded on their way."""
    world = backend.world
    sensor = next(a for a in backend._sensor_actors if a.type_id == sensor_type)
    events, callback = [], world._listeners[sensor.id]
    world._listeners[sensor.id] = lambda event: events.append(event) or callback(event)
    return events


def _change_lane(carla_double, backend, pause_s: float = 0.0) -> list[tuple[int, bool]]:
    """(frame, lane invasion) of 36 steps that move the ego, tilted 10 degrees, 0.1 m at a time
    across a marking."""
    steps = []
    for i in range(36):
        _place(carla_double, backend._ego, 0.1 * i, tilt=-10.0)
        _, state = backend.step(np.zeros(2, np.float32))
        steps.append((backend.world._frame, state.lane_invasion))
        time.sleep(pause_s)
    return steps


@pytest.mark.parametrize("delay", [None, 0.02])
def test_a_lane_change_is_one_invasion_on_the_frame_it_began(tmp_path, carla_double, monkeypatch, delay):
    """CARLA's lane-invasion sensor reports every corner of the bounding box that crosses a marking
    (client/LaneInvasionSensor.cpp), so one lane change sends up to four events, and libcarla may
    run it after the tick returned: the step of the first event's frame reports one invasion."""
    monkeypatch.setattr(carla_double.World, "_event_delay_s", delay)
    monkeypatch.setattr("actors.envs.carla_env.EVENT_GRACE_S", 0.5)  # generous on a loaded machine
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    backend = env.backend
    try:
        env.reset(seed=0)
        events = _recorded(backend, "sensor.other.lane_invasion")
        steps = _change_lane(carla_double, backend)
        assert len(events) == 4 and all(len(e.crossed_lane_markings) == 1 for e in events), "one event per corner"
        assert len({e.frame for e in events}) == 4
        assert [frame for frame, invaded in steps if invaded] == [events[0].frame]
    finally:
        env.close()


def test_a_late_event_counts_once_on_the_next_step(tmp_path, carla_double, monkeypatch):
    """An event that comes after the grace wait is not lost, nor counted twice."""
    monkeypatch.setattr(carla_double.World, "_event_delay_s", 0.05)
    monkeypatch.setattr("actors.envs.carla_env.EVENT_GRACE_S", 0.0)
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    backend = env.backend
    try:
        env.reset(seed=0)
        events = _recorded(backend, "sensor.other.lane_invasion")
        steps = _change_lane(carla_double, backend, pause_s=0.1)  # a tick's late events arrive before the next
        assert len(events) == 4 and sum(invaded for _, invaded in steps) == 1
    finally:
        env.close()


def test_collisions_count_once_per_other_actor_and_not_with_the_sidewalk(tmp_path, carla_double):
    """CARLA's collision sensor reports a contact on every tick it lasts, and the curb as an actor
    of id 0 typed "static.sidewalk" (Sensor/CollisionSensor.cpp, CarlaEpisode::SerializeActor).
    As the leaderboard's CollisionTest: sidewalk scrapes do not count, static props do, and the
    same other actor within 5 s is the same collision."""
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    backend = env.backend
    c = carla_double
    try:
        env.reset(seed=0)
        events = _recorded(backend, "sensor.other.collision")
        _place(c, backend._ego, 4.8)  # the outer corners past the road edge, on the curb
        scrapes = [backend.step(np.zeros(2, np.float32))[1].collision for _ in range(3)]
        assert [e.other_actor.type_id for e in events] == ["static.sidewalk"] * 3 and events[0].other_actor.id == 0
        assert scrapes == [False] * 3
        _place(c, backend._ego, 0.0)
        ego = backend._ego.get_transform()
        fwd = ego.get_forward_vector()
        ahead = c.Location(ego.location.x + 2.5 * fwd.x, ego.location.y + 2.5 * fwd.y, ego.location.z)
        barrier = backend.world.spawn_actor(backend.blueprints.find("static.prop.streetbarrier"), c.Transform(ahead))
        hits = [backend.step(np.zeros(2, np.float32))[1].collision for _ in range(3)]
        assert [e.other_actor.id for e in events[3:]] == [barrier.id] * 3, "reported on every tick of the contact"
        assert hits == [True, False, False]
    finally:
        env.close()


def test_a_collision_with_the_same_actor_is_forgotten_after_5_s():
    """The leaderboard's CollisionTest.MAX_ID_TIME: the same other actor within 5 s (100 frames)
    is one collision; another actor, or the same one later, is a new one."""
    from types import SimpleNamespace

    from actors.envs.carla_env import _Sensors

    sensors = _Sensors()
    car, van = SimpleNamespace(id=7, type_id="vehicle.audi.tt"), SimpleNamespace(id=8, type_id="vehicle.ford.transit")
    reported = []
    for frame, other in [(10, car), (11, car), (40, car), (41, van), (200, car)]:
        sensors.on_collision(SimpleNamespace(frame=frame, other_actor=other))
        reported.append(sensors.events(frame)[0])
    assert reported == [True, False, False, True, True]


def test_route_file(tmp_path, carla_double):
    theta = np.linspace(0.3, 1.6, 60)
    (tmp_path / "route.txt").write_text("# x y\n" + "\n".join(f"{80 * math.cos(t)} {80 * math.sin(t)}" for t in theta))
    cfg = carla_config(tmp_path, f"carla.route_file={tmp_path / 'route.txt'}")
    env = session_env(cfg)
    try:
        obs, _ = env.reset(seed=0)
        loc = env.backend._ego.get_transform().location
        assert math.hypot(loc.x - 80 * math.cos(0.3), loc.y - 80 * math.sin(0.3)) < 0.1
        assert abs(obs["vector"][1]) < 0.01 and abs(obs["vector"][2]) < 0.01
    finally:
        env.close()
    (tmp_path / "bad.txt").write_text("1 2 3\n")
    with pytest.raises(ConfigError, match="bad.txt"):
        check_backend(carla_config(tmp_path, f"carla.route_file={tmp_path / 'bad.txt'}"))
    (tmp_path / "short.txt").write_text("0 0\n10 0\n")
    with pytest.raises(ConfigError, match="shorter than env.route_length_m"):
        check_backend(carla_config(tmp_path, f"carla.route_file={tmp_path / 'short.txt'}"))
    with pytest.raises(ConfigError, match="does not exist"):
        check_backend(carla_config(tmp_path, "carla.route_file=/nonexistent/route.txt"))


def test_an_ego_spawn_collision_tries_another_spawn_point(tmp_path, carla_double):
    """A vehicle standing on the spawn point drawn first is no server failure (a session raises
    where the backend would relaunch): the ego spawns at another one, on a route from there."""
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    backend = env.backend
    try:
        env.reset(seed=5)
        first = backend._ego.get_transform()
        backend._destroy()
        backend.world.spawn_actor(backend.blueprints.find("vehicle.audi.tt"), first)  # parked, not ours
        obs, _ = env.reset(seed=5)
        spawned = backend._ego.get_transform().location
        assert spawned.distance(first.location) > 2.0
        assert abs(obs["vector"][1]) < 0.01 and abs(obs["vector"][2]) < 0.01, "the route starts where the ego stands"
    finally:
        env.close()


def test_a_route_file_start_is_retried_a_little_higher_then_given_up(tmp_path, carla_double, monkeypatch):
    """A route file fixes the start: a spawn colliding with the road there is retried 0.2 m
    higher each time; after a bounded number of tries the session raises, so the backend recovers."""
    theta = np.linspace(0.3, 1.6, 60)
    (tmp_path / "route.txt").write_text("\n".join(f"{80 * math.cos(t)} {80 * math.sin(t)}" for t in theta))
    cfg = carla_config(tmp_path, f"carla.route_file={tmp_path / 'route.txt'}", "carla.traffic=[0,0,0]")
    monkeypatch.setattr(carla_double.World, "_road_clearance_m", 0.8)  # the road surface is at z=0
    env = session_env(cfg)
    try:
        env.reset(seed=0)
        ego_z = env.backend._ego.get_transform().location.z
        assert ego_z == pytest.approx(0.9), "two tries collided with the road, the third stands 0.4 m higher"
        monkeypatch.setattr(carla_double.World, "_road_clearance_m", 50.0)
        with pytest.raises(RuntimeError, match="ego vehicle not spawned in 5 tries"):
            env.reset(seed=1)
    finally:
        env.close()


def test_teardown_is_confirmed_and_ticked_before_the_next_ego_spawns(tmp_path, carla_double, monkeypatch):
    env = session_env(carla_config(tmp_path))
    backend = env.backend
    try:
        env.reset(seed=1)
        world, old = backend.world, {a.id for a in backend._sensor_actors} | {backend._ego.id, *backend._npcs}
        calls = []
        batch, tick, spawn = backend.client.apply_batch_sync, world.tick, world.try_spawn_actor
        monkeypatch.setattr(backend.client, "apply_batch", lambda *a: calls.append("apply_batch") or batch(*a))
        monkeypatch.setattr(backend.client, "apply_batch_sync",
                            lambda commands, *a: calls.append(("batch", len(commands))) or batch(commands, *a))
        monkeypatch.setattr(world, "tick", lambda *a: calls.append("tick") or tick(*a))
        monkeypatch.setattr(world, "try_spawn_actor",
                            lambda *a, **k: calls.append(("spawn", bool(old & set(world._actors)))) or spawn(*a, **k))
        env.reset(seed=2)
        assert calls[:3] == [("batch", len(old)), "tick", ("spawn", False)], calls
        assert "apply_batch" not in calls
    finally:
        env.close()


def test_connecting_clears_what_an_earlier_client_left(tmp_path, carla_double):
    """With carla.launch=false a client that died (a killed client process, a crashed actor) left
    its ego, sensors and NPCs on the server; the next client of the env destroys them first."""
    import subprocess

    cfg = carla_config(tmp_path, "carla.launch=false")
    server = subprocess.Popen([sys.executable, str(FAKE_SERVER), f"-carla-rpc-port={cfg.carla.port}"],
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        earlier = session_env(cfg)
        earlier.reset(seed=0)
        world = earlier.backend.world
        stale = set(world._actors)
        assert len(stale) == 1 + 4 + 3
        carla_double._tm_map.pop(earlier.backend.ports.tm)._listener.close()  # its process died, and its TM
        env = session_env(cfg)
        try:
            assert env.backend.world is world
            assert not stale & set(world._actors) and not stale & set(world._listeners)
            env.reset(seed=0)  # the same spawn point: free again
            assert len(world._actors) == 1 + 4 + 3
        finally:
            env.close()
        assert world._actors == {}
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the stand-in and its child
        server.wait()


# -- Traffic Managers: one map per process ------------------------------------------------------
def test_the_double_keeps_traffic_managers_as_libcarla_does(tmp_path, carla_double):
    """What the backend is built around (libcarla 0.9.16: TrafficManager.cpp, Simulator.cpp,
    TrafficManagerLocal.cpp): one map of Traffic Managers per process, keyed by port; every world
    tick in the process runs a cycle of each synchronous one; get_trafficmanager(port) hands back
    the port's entry, whatever server it is bound to; one bound to a dead server ends the process
    at its next cycle, shutting it down included."""
    cfg = carla_config(tmp_path)
    servers = [CarlaServer(cfg.carla, slot) for slot in (0, 1)]
    try:
        for server in servers:
            server.start()
        clients = [carla_double.Client(cfg.carla.host, server.ports.rpc) for server in servers]
        worlds = [client.get_world() for client in clients]
        handles = [client.get_trafficmanager(server.ports.tm) for client, server in zip(clients, servers)]
        for tm in handles:
            tm.set_synchronous_mode(True)
        entries = [carla_double._tm_map[server.ports.tm] for server in servers]
        worlds[0].tick()
        assert [tm.cycles for tm in entries] == [1, 1], "one world's tick runs every Traffic Manager"
        servers[1].restart("a test")
        relaunched = carla_double.Client(cfg.carla.host, servers[1].ports.rpc)
        handle = relaunched.get_trafficmanager(servers[1].ports.tm)
        assert carla_double._tm_map[servers[1].ports.tm].world is worlds[1] is not relaunched.get_world(), \
            "the port's Traffic Manager is the dead server's"
        with pytest.raises(carla_double._Terminate):
            relaunched.get_world().tick()
        with pytest.raises(carla_double._Terminate):
            handle.shut_down()
        handles[0].shut_down()
        assert carla_double._tm_map == {}
    finally:
        for server in servers:
            server.kill()


def _drive(env, steps: int = 5) -> None:
    for _ in range(steps):
        env.step(np.array([0.0, 0.3], np.float32))


def test_envs_made_one_after_another_in_one_process(tmp_path, carla_double):
    """`learner.evaluate_checkpoint` makes and closes an env on the same slot for each checkpoint,
    in one process: no Traffic Manager of a closed env (bound to its killed server) may stay in
    that process's map, to be ticked by the next env's world."""
    cfg = carla_config(tmp_path)
    for seed in range(2):
        env = make_env(cfg)
        try:
            env.reset(seed=seed)
            _drive(env)
            assert env.backend.server.restarts == 0
        finally:
            env.close()
    assert carla_double._tm_map == {}, "Traffic Managers live in the client processes"


def test_serial_mode_training_outlives_the_evaluation_server(tmp_path, carla_double):
    """Serial mode's training and evaluation envs once shared a process, so each env's world
    ticks ran the other env's Traffic Manager: a dead evaluation server ended the training
    process at its next tick. Each env's client now has a process of its own."""
    from learner.serial import SerialRun

    cfg = carla_config(tmp_path, "env.max_episode_steps=30", "eval.num_episodes=1", "eval.references=false",
                       "replay.capacity=1000", "learner.device=cpu")
    run = SerialRun(cfg, tmp_path / "run").init()
    try:
        run._evaluate()
        os.killpg(run.eval_env.backend.server.process.pid, signal.SIGKILL)  # it dies between evaluations
        run.env.reset(seed=0)
        _drive(run.env)
        assert run.env.backend.server.restarts == 0
        run._evaluate()  # the evaluation env relaunches its server
        assert run.eval_env.backend.server.restarts == 1 and run.core.last_eval["eval/avg_episode_length"] > 0
        assert carla_double._tm_map == {}
    finally:
        run.close()


# -- server lifecycle ----------------------------------------------------------------------------
def test_ports_never_collide_and_taken_ones_are_skipped(tmp_path):
    cfg = load_config(overrides=[f"carla.port={_free_base(4)}", "carla.tm_port=8000"])
    slots = [allocate_ports(cfg.carla, i, free=lambda p: True) for i in range(8)]
    used = [p for ports in slots for p in (ports.rpc, ports.streaming, ports.secondary)]
    assert len(set(used)) == len(used) and len({p.tm for p in slots}) == 8
    taken = {slots[0].rpc}
    moved = allocate_ports(cfg.carla, 0, free=lambda p: p not in taken)
    assert moved.rpc == cfg.carla.port + PORTS_PER_SERVER * SLOT_SPAN and moved.tm == 8000 + SLOT_SPAN
    with pytest.raises(CarlaUnavailable, match="no free ports"):
        allocate_ports(cfg.carla, 0, free=lambda p: False)


def test_each_server_slot_renders_on_its_own_gpu():
    """carla.gpus spreads a node's servers over its GPUs by slot; unset, no adapter flag (CARLA's
    default, adapter 0, for every server)."""
    base = f"carla.port={_free_base(4 * 6)}"

    def adapters(*overrides: str) -> list[list[str]]:
        cfg = load_config(overrides=[base, *overrides]).carla
        return [[a for a in CarlaServer(cfg, slot).command() if "graphicsadapter" in a.lower()] for slot in range(6)]

    def flags(gpu: int) -> list[str]:
        # UE4's Vulkan flag, and the console variable as CARLA's docs set it (adv_multigpu)
        return [f"-graphicsadapter={gpu}", f"-ini:[/Script/Engine.RendererSettings]:r.GraphicsAdapter={gpu}"]

    assert adapters() == [[]] * 6
    assert adapters("carla.gpus=[1,2,3]") == [flags(g) for g in (1, 2, 3, 1, 2, 3)]
    assert adapters("carla.gpus=[0]") == [flags(0)] * 6


def test_each_server_slot_runs_on_its_own_cpus(tmp_path, carla_double, monkeypatch):
    """carla.server_cpus pins each launched server, the binary CarlaUE4.sh starts included, to CPUs
    of its own, taken by slot from those the actor may use; unset, servers run unpinned."""
    allowed = sorted(os.sched_getaffinity(0))
    cfg = carla_config(tmp_path, "carla.server_cpus=1").carla
    server = CarlaServer(cfg, 1)
    server.start()
    try:
        pinned = {allowed[1 % len(allowed)]}
        assert server.cpus == pinned
        assert os.sched_getaffinity(server.process.pid) == os.sched_getaffinity(_child_pid(server.log_path)) == pinned
        assert f"on CPUs {sorted(pinned)}" in server.log_path.read_text()
    finally:
        server.kill()
    assert CarlaServer(carla_config(tmp_path).carla, 1).cpus is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    cfg = carla_config(tmp_path, "carla.server_cpus=3").carla
    assert [CarlaServer(cfg, slot).cpus for slot in range(3)] == [{0, 1, 2}, {3, 4, 5}, {6, 7, 0}]


def _runner(env, chunks):
    cfg = load_config(overrides=["td3.learning_starts=1000000"])
    adder = ChunkAdder(actor_id=0, chunk_steps=8, sink=chunks.append)
    return EpisodeRunner(env, Actor(None, cfg, np.random.default_rng(0), None), adder, seed=0)


@pytest.mark.parametrize("fault", ["hang", "die"])
def test_hung_or_dead_server_is_relaunched_and_the_episode_dropped(tmp_path, carla_double, monkeypatch, fault):
    faults = tmp_path / "faults"
    faults.write_text(f"{fault} 30\nok\n")
    monkeypatch.setenv("FAKE_CARLA_FAULTS", str(faults))
    env = make_env(carla_config(tmp_path, "carla.traffic=[0,0,0]", "env.max_episode_steps=1000"))
    backend = env.backend
    log = backend.server.log_path
    first_pid, first_child, first_client = backend.server.process.pid, _child_pid(log), backend.client.pid
    chunks: list = []
    runner = _runner(env, chunks)
    try:
        start = time.monotonic()
        for step in range(60):
            runner.step(step)
            if runner.simulator_failures:
                break
        assert runner.simulator_failures == 1
        assert time.monotonic() - start < 15
        assert backend.server.restarts == 1 and backend.metrics()["carla_restarts"] == 1
        assert backend.server.process.pid != first_pid
        assert not _alive(first_pid) and not _alive(first_child), "the whole process group is gone"
        assert backend.client.pid != first_client and not _alive(first_client), "and the client process with it"
        sent = [c for c in chunks if c.episode_id == chunks[0].episode_id]
        assert sum(len(c.actions) for c in sent) >= 24, "chunks sent before the failure stay"
        assert not any(c.terminated.any() or c.truncated.any() for c in sent), "the lost episode is not marked ended"
        for step in range(60, 100):  # the new server serves the next episode
            runner.step(step)
        assert runner.simulator_failures == 1 and runner.episodes == 0
        text = log.read_text()
        assert text.count("--- launch") == 2 and f"fault {fault} 30" in text and "fault ok" in text
    finally:
        env.close()
    assert backend.server.process is None and not _alive(backend.client.pid)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_client_process_is_replaced_with_its_server(tmp_path, carla_double, signum):
    """A client process that dies (as a real one does when a Traffic Manager thread throws) or
    hangs (libcarla waits for a Traffic Manager cycle without a time-out) loses the episode; the
    next reset relaunches the server with a new client process."""
    env = make_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    backend = env.backend
    try:
        env.reset(seed=0)
        first = backend.client.pid
        os.kill(first, signum)
        with pytest.raises(SimulatorFailure, match="it died" if signum == signal.SIGKILL else "no answer within 4 s"):
            env.step(np.zeros(2, np.float32))
        assert not _alive(first)
        env.reset(seed=1)
        env.step(np.zeros(2, np.float32))
        assert backend.server.restarts == 1 and backend.client.pid != first
    finally:
        env.close()


def test_scheduled_restart_every_n_episodes(tmp_path, carla_double):
    """A relaunch, scheduled or not, replaces the client process too: the stopped server's
    Traffic Manager goes with it instead of being handed back for the new server."""
    env = make_env(carla_config(tmp_path, "carla.restart_every_episodes=2"))
    try:
        servers, clients = [], []
        for seed in range(5):
            env.reset(seed=seed)
            _drive(env)
            servers.append(env.backend.server.process.pid)
            clients.append(env.backend.client.pid)
        assert servers[0] == servers[1] != servers[2] == servers[3] != servers[4]
        assert clients[0] == clients[1] != clients[2] == clients[3] != clients[4]
        assert env.backend.server.restarts == 2 and not _alive(clients[0])
    finally:
        env.close()


def test_connect_to_a_running_server_and_unreachable_address(tmp_path, carla_double):
    import subprocess

    cfg = carla_config(tmp_path, "carla.launch=false", "carla.traffic=[0,0,0]")
    server = subprocess.Popen([sys.executable, str(FAKE_SERVER), f"-carla-rpc-port={cfg.carla.port}"],
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = make_env(cfg)  # waits (up to start_timeout_s) for the server someone else started
        env.reset(seed=0)
        env.step(np.zeros(2, np.float32))
        env.close()
        assert server.poll() is None, "a server we only connected to is not killed"
        env = session_env(cfg)  # the same, in this process, to look at the world it leaves
        env.reset(seed=0)
        env.close()
        assert not env.backend.world.get_settings().synchronous_mode, "the server is left free for others"
        assert server.poll() is None
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the stand-in and its child
        server.wait()
    cfg.carla.start_timeout_s = 1.5
    start = time.monotonic()
    with pytest.raises(CarlaUnavailable, match=f"no CARLA server answered at 127.0.0.1:{cfg.carla.port} within 2 s"):
        CarlaServer(cfg.carla, 0).start()
    assert time.monotonic() - start < 5


def test_a_server_that_exits_at_launch_reports_its_log(tmp_path, carla_double, monkeypatch):
    faults = tmp_path / "faults"
    faults.write_text("refuse\n")
    monkeypatch.setenv("FAKE_CARLA_FAULTS", str(faults))
    cfg = carla_config(tmp_path, "carla.max_start_failures=1")
    with pytest.raises(CarlaUnavailable, match=r"exited with code 3 before answering; its log \(.*carla_0.log\) ends:\n(.|\n)*fault refuse"):
        CarlaServer(cfg.carla, 0).start()


# A packaged CARLA build, as under /workspace in the carlasim/carla image: CarlaUE4.sh starts the
# binary as a child without exec ("$UE4_PROJECT_ROOT/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping"
# CarlaUE4 "$@"), so the parent-death signal set on the script never reaches it. The stand-in
# binary is the stand-in server, run by its interpreter line in the process that was exec'd.
CARLAUE4_SH = '#!/bin/sh\nROOT=$(dirname "$(readlink -f "$0")")\n"$ROOT/{binary}" CarlaUE4 "$@"\n'
SHIPPING = "CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping"
STAND_IN_BINARY = '#!{python}\nimport runpy\nrunpy.run_path({server!r}, run_name="__main__")\n'

OWNER = """
import pickle, sys, time
from actors.envs.carla_server import CarlaServer
server = CarlaServer(pickle.load(open(sys.argv[1], "rb")), 0)
server.start()
print(server.ports.rpc, flush=True)
time.sleep(3600)
"""


def _packaged_build(root: Path) -> Path:
    """`root`/CarlaUE4.sh and `root`/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping, stand-ins."""
    binary = root / SHIPPING
    binary.parent.mkdir(parents=True)
    binary.write_text(STAND_IN_BINARY.format(python=sys.executable, server=str(FAKE_SERVER)))
    (root / "CarlaUE4.sh").write_text(CARLAUE4_SH.format(binary=SHIPPING))
    for path in (binary, root / "CarlaUE4.sh"):
        path.chmod(0o755)
    return root


def _server_of_a_killed_actor(tmp_path, cfg) -> tuple[int, int]:
    """Launches env 0's server from another process, the actor, and SIGKILLs the actor once the
    server answers; returns the pids of the server binary and of the child it started."""
    import pickle

    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOUBLE_ROOT), str(Path(__file__).parents[1])])}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "cfg.pkl")], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert int(owner.stdout.readline()) == cfg.port
    finally:
        owner.kill()
        owner.wait()
    log = (tmp_path / "carla" / "carla_0.log").read_text()
    return int(log.split("fake CARLA server pid ")[-1].split()[0]), _child_pid(tmp_path / "carla" / "carla_0.log")


def test_a_server_orphaned_by_a_killed_actor_is_reaped_by_the_next_launch(tmp_path, carla_double):
    """A server_command that is a script (CarlaUE4.sh): a SIGKILLed actor (Ray's ray.kill) takes
    only the script with it, and the binary it started keeps the slot's ports (and, on a real node,
    its GPU). The next launch on the node kills servers whose owner is gone, so the slot gets its
    own ports back instead of a second server."""
    root = _packaged_build(tmp_path / "workspace")
    cfg = carla_config(tmp_path, f"carla.server_command={root / 'CarlaUE4.sh'}").carla
    binary, child = _server_of_a_killed_actor(tmp_path, cfg)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and port_free(cfg.port):
        time.sleep(0.05)
    assert _alive(binary) and not port_free(cfg.port), "the script died with its actor, the binary did not"
    server = CarlaServer(cfg, 0)
    try:
        assert server.ports.rpc == cfg.port, "the orphan's ports are the slot's again"
        assert not _alive(binary) and not _alive(child)
        server.start()
        assert "fake CARLA server pid" in server.log_tail()
    finally:
        server.kill()
    other = CarlaServer(cfg, 1)  # a live owner's server (this process's) is left alone
    other.start()
    try:
        CarlaServer(cfg, 2)
        assert other.process.poll() is None and not port_free(other.ports.rpc)
    finally:
        other.kill()


def test_the_default_server_command_dies_with_its_killed_actor(tmp_path, carla_double):
    """The default carla.server_command launches the server binary itself, not CarlaUE4.sh (which
    starts it as a child), so the parent-death signal set at launch reaches the server: a SIGKILLed
    actor's server dies at once, without waiting for a later launch on the node to reap it. The
    map goes after the project name the binary takes first."""
    root = _packaged_build(tmp_path / "workspace")  # a build as the image's /workspace, script and binary
    default = CarlaConfig().server_command
    assert default.startswith("/workspace/")
    cfg = carla_config(tmp_path, f"carla.server_command={default.replace('/workspace/', f'{root}/', 1)}").carla
    binary, child = _server_of_a_killed_actor(tmp_path, cfg)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (_alive(binary) or not port_free(cfg.port)):
            time.sleep(0.05)
        assert not _alive(binary), "the server outlived its actor"
        assert port_free(cfg.port), "the dead actor's server still holds the slot's port"
    finally:
        reap_orphans()  # what the stand-in started (a real server starts no child)
    words = CarlaServer(cfg, 0).command()
    assert words[:3] == [str(root / SHIPPING), "CarlaUE4", "/Game/Carla/Maps/Town01"]
    assert words[3:5] == ["-RenderOffScreen", "-nosound"], words


def test_a_server_launched_from_a_thread_outlives_the_thread(tmp_path, carla_double):
    """The parent-death signal fires when the thread that forked the server ends, not the
    process: a server launched off the main thread must not die with that thread."""
    server = CarlaServer(carla_config(tmp_path).carla, 0)
    launch = threading.Thread(target=server.start)
    launch.start()
    launch.join()
    try:
        assert server.process is not None
        time.sleep(1.0)
        assert server.process.poll() is None, f"the server died with its launching thread ({server.process.returncode})"
        server.wait_ready()
    finally:
        server.kill()
