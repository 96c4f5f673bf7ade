"""CARLA servers that explain themselves, GPUs chosen by default, and the small server-side items of
issue 34: the stand-in server (tests/carla_double/fake_server.py) logs as the shipping binary does,
and `nvidia-smi` is a script on PATH."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from actors.envs import eval_slot, make_env, rollout_slot
from actors.envs import carla_gpus
from actors.envs.carla_env import SPAWN_TRIES, CarlaSession, other_seed
from actors.envs.carla_diagnosis import BANNER_LINES, GPU_MEMORY, PORT, VULKAN, likely_causes
from actors.envs.carla_server import CarlaServer, CarlaUnavailable
from common.config import load_config
from tests.test_carla import FAKE_SERVER, _free_base, carla_config, carla_double, session_env  # noqa: F401

# -- the log -------------------------------------------------------------------------------------


def _run_stand_in(tmp_path, *flags: str) -> tuple[str, str]:
    """(stdout, Saved/Logs/CarlaUE4.log) of a stand-in launch that fails at once (no Vulkan)."""
    faults = tmp_path / "faults"
    faults.write_text("novulkan\n")
    env = {**os.environ, "FAKE_CARLA_FAULTS": str(faults), "FAKE_CARLA_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, str(FAKE_SERVER), "CarlaUE4", f"-carla-rpc-port={_free_base(3)}", *flags],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 1
    return out.stdout, (tmp_path / "home" / "CarlaUE4" / "Saved" / "Logs" / "CarlaUE4.log").read_text()


def test_the_stand_in_prints_its_log_only_when_told(tmp_path):
    """As a UE4 shipping build: two lines on stdout, the log in Saved/Logs; -stdout passes Display
    lines and up, -FullStdOutLogOutput every line."""
    quiet, saved = _run_stand_in(tmp_path)
    assert quiet.splitlines() == list(BANNER_LINES)
    assert "Cannot find a compatible Vulkan driver (ICD)" in saved and "Cannot find" not in quiet
    display, _ = _run_stand_in(tmp_path, "-stdout")
    full, _ = _run_stand_in(tmp_path, "-stdout", "-FullStdOutLogOutput")
    assert "Cannot find a compatible Vulkan driver (ICD)" in display
    assert "Running engine for game" in display and "Running engine for game" in full
    assert "LogCarla" not in display and "LogCarla: Loading CARLA settings" in full, "Log verbosity: full only"
    backups = list((tmp_path / "home" / "CarlaUE4" / "Saved" / "Logs").glob("CarlaUE4-backup-*.log"))
    assert len(backups) == 2, "one log per install: each start moves the last one aside"


def test_launches_send_the_servers_own_log_to_its_slot_log(tmp_path, carla_double, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_HOME", str(tmp_path / "home"))
    server = CarlaServer(carla_config(tmp_path).carla, 0)
    assert server.command()[-2:] == ["-stdout", "-FullStdOutLogOutput"]
    server.start()
    try:
        text = server.log_path.read_text()
        assert "LogCarla: Listening on RPC port" in text, "Log-verbosity lines reach the slot's log"
    finally:
        server.kill()
    given = carla_config(tmp_path, f"carla.server_command={sys.executable} {FAKE_SERVER} -stdout").carla
    assert CarlaServer(given, 0).command().count("-stdout") == 1


@pytest.mark.parametrize("fault, cause, code", [("novulkan", VULKAN, 1), ("oom", GPU_MEMORY, -11)])
def test_a_server_that_keeps_failing_to_start_is_explained_and_given_up(tmp_path, carla_double, monkeypatch,
                                                                        fault, cause, code):
    faults = tmp_path / "faults"
    faults.write_text(f"{fault}\n" * 5)
    monkeypatch.setenv("FAKE_CARLA_FAULTS", str(faults))
    monkeypatch.setenv("FAKE_CARLA_HOME", str(tmp_path / "home"))
    server = CarlaServer(carla_config(tmp_path, "carla.max_start_failures=3").carla, 0)
    with pytest.raises(CarlaUnavailable) as err:
        server.start()
    message = str(err.value)
    assert f"exited with code {code} before answering" in message
    assert cause in message and "gave up after 3 launches" in message
    assert server.log_path.read_text().count("--- launch") == 3
    assert faults.read_text().splitlines() == [fault] * 2, "no fourth launch"


def test_a_start_failure_that_goes_away_is_relaunched(tmp_path, carla_double, monkeypatch):
    faults = tmp_path / "faults"
    faults.write_text("novulkan\nrefuse\nok\n")
    monkeypatch.setenv("FAKE_CARLA_FAULTS", str(faults))
    monkeypatch.setenv("FAKE_CARLA_HOME", str(tmp_path / "home"))
    server = CarlaServer(carla_config(tmp_path, "carla.max_start_failures=2").carla, 0)
    server.start()
    server.kill()
    assert server.log_path.read_text().count("--- launch") == 3


def test_a_taken_port_is_named(tmp_path, carla_double, monkeypatch):
    monkeypatch.setenv("FAKE_CARLA_HOME", str(tmp_path / "home"))
    server = CarlaServer(carla_config(tmp_path, "carla.max_start_failures=1").carla, 0)
    with socket.socket() as other:  # taken after the ports were chosen, as by a server starting beside it
        other.bind(("127.0.0.1", server.ports.rpc))
        other.listen()
        with pytest.raises(CarlaUnavailable, match="bind: Address already in use") as err:
            server.start()
    assert PORT in str(err.value)


def test_known_log_lines_name_their_causes():
    assert likely_causes("LogVulkanRHI: Error: Cannot find a compatible Vulkan driver (ICD).", 1) == [VULKAN]
    assert likely_causes("\n".join(BANNER_LINES), 0)[0] == VULKAN, "a silent exit: what CARLA issues report"
    assert likely_causes("...with error VK_ERROR_OUT_OF_DEVICE_MEMORY\nSignal 11 caught.", -11)[0] == GPU_MEMORY


def test_stand_in_servers_crash_on_a_schedule(tmp_path, carla_double, monkeypatch):
    """FAKE_CARLA_CRASH_AFTER_S: every launch dies with signal 11 that long after it listens."""
    monkeypatch.setenv("FAKE_CARLA_CRASH_AFTER_S", "2-3")
    monkeypatch.setenv("FAKE_CARLA_HOME", str(tmp_path / "home"))
    server = CarlaServer(carla_config(tmp_path).carla, 0)
    server.start()
    try:
        assert server.process.wait(timeout=10) == -11
        assert "Signal 11 caught." in server.log_path.read_text()
    finally:
        server.kill()


# -- GPUs ----------------------------------------------------------------------------------------
FAKE_NVIDIA_SMI = """#!/bin/sh
# nvidia-smi --query-gpu=index,pci.bus_id,uuid --format=csv,noheader, for {count} GPUs
[ "$1" = "--query-gpu=index,pci.bus_id,uuid" ] || exit 2
{lines}
"""


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """Installs an nvidia-smi on PATH that lists the given (index, bus id) GPUs."""
    def install(*gpus: tuple[int, str]) -> None:
        lines = "\n".join(f"echo '{i}, {bus}, GPU-{i:08d}-0000-0000-0000-000000000000'" for i, bus in gpus)
        script = tmp_path / "bin" / "nvidia-smi"
        script.parent.mkdir(exist_ok=True)
        script.write_text(FAKE_NVIDIA_SMI.format(count=len(gpus), lines=lines))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
        carla_gpus.node_gpus.cache_clear()

    yield install
    carla_gpus.node_gpus.cache_clear()


def _adapters(*overrides: str) -> list[int | None]:
    cfg = load_config(overrides=[f"carla.port={_free_base(4 * 4)}", *overrides]).carla
    return [CarlaServer(cfg, slot).gpu for slot in range(4)]


def test_servers_leave_the_learners_gpu_alone_on_a_multi_gpu_node(fake_gpus):
    fake_gpus((0, "00000000:1A:00.0"), (1, "00000000:3D:00.0"), (2, "00000000:8B:00.0"))
    assert _adapters() == [1, 2, 1, 2], "GPU 0 is the learner's"
    assert _adapters("carla.learner_gpu=2") == [0, 1, 0, 1]
    assert _adapters("carla.learner_gpu=-1") == [0, 1, 2, 0], "asked to share it"
    assert _adapters("carla.gpus=[0]") == [0] * 4, "asked for it"
    assert _adapters("carla.launch=false") == [None] * 4, "a server we connect to is someone else's"


def test_adapter_indices_follow_pci_bus_order_not_nvidia_smi_numbers(fake_gpus):
    """Vulkan lists GPUs by PCI bus id; a node whose numbering differs (here nvidia-smi's index 0 is
    the GPU on bus 0x3D) still gets the adapter of the GPU it means."""
    fake_gpus((0, "00000000:3D:00.0"), (1, "00000000:1A:00.0"))
    assert _adapters() == [0] * 4, "GPU 1 on bus 1A is Vulkan adapter 0"


def test_one_gpu_or_none_leaves_the_choice_to_the_engine(fake_gpus, monkeypatch):
    fake_gpus((0, "00000000:1A:00.0"))
    assert _adapters() == [None] * 4
    monkeypatch.setenv("PATH", "/nonexistent")
    carla_gpus.node_gpus.cache_clear()
    assert _adapters() == [None] * 4


# -- the smaller items ---------------------------------------------------------------------------
def test_thread_pool_flags_reach_the_server():
    base = f"carla.port={_free_base(4)}"
    words = CarlaServer(load_config(overrides=[base, "carla.server_rpc_threads=4",
                                               "carla.server_streaming_threads=2"]).carla, 0).command()
    assert "-RPCThreads=4" in words and "-StreamingThreads=2" in words
    assert not any("Threads=" in w for w in CarlaServer(load_config(overrides=[base]).carla, 0).command())


def test_elastic_actors_never_take_the_evaluators_slot():
    cfg = load_config(overrides=["actors.num_actors=2", "actors.envs_per_actor=2"])
    slots = [rollout_slot(cfg, i, j) for i in range(6) for j in range(2)]
    assert slots[:4] == [0, 1, 2, 3] and eval_slot(cfg) == 4
    assert eval_slot(cfg) not in slots and len(set(slots)) == len(slots)


def _spawn_points_drawn(seed: int, cfg, carla) -> set[int]:
    """The spawn points (by index) a reset with `seed` tries, drawn as the session draws them."""
    session = SimpleNamespace(route_points=None, map=carla.Map(cfg.carla.town), env_cfg=cfg.env, carla=carla)
    spawns = session.map.get_spawn_points()
    rng = np.random.default_rng(seed)
    drawn = set()
    for _ in range(SPAWN_TRIES):
        _, tf = CarlaSession._route_for(session, rng)
        drawn.add(min(range(len(spawns)), key=lambda k: spawns[k].location.distance(tf.location)))
    return drawn


def test_a_reset_that_fails_twice_tries_another_seed(tmp_path, carla_double, monkeypatch, caplog):
    """A failure that follows the seed (something stands on every spawn point its draws hit) does
    not go away with relaunches: the last attempt draws other spawn points."""
    cfg = carla_config(tmp_path, "carla.traffic=[0,0,0]")
    seed = next(s for s in range(100)
                if not _spawn_points_drawn(other_seed(s), cfg, carla_double) <= _spawn_points_drawn(s, cfg, carla_double))
    blocked = _spawn_points_drawn(seed, cfg, carla_double)
    monkeypatch.setenv("FAKE_CARLA_BLOCKED_SPAWNS", ",".join(map(str, sorted(blocked))))
    env = make_env(cfg)
    try:
        env.reset(seed=seed)
        assert env.backend.server.restarts == 2
        assert f"trying seed {other_seed(seed)}" in caplog.text
    finally:
        env.close()


def _place_ahead(carla, session, blueprint: str, metres: float) -> None:
    """Spawns a `blueprint` actor (not on autopilot) `metres` ahead of the session's ego."""
    ego_tf = session._ego.get_transform()
    fwd = ego_tf.get_forward_vector()
    where = carla.Location(ego_tf.location.x + metres * fwd.x, ego_tf.location.y + metres * fwd.y, 0.5)
    session.world.spawn_actor(session.blueprints.find(blueprint), carla.Transform(where, ego_tf.rotation))


def test_the_obstacle_sensor_sees_vehicles_only(tmp_path, carla_double):
    """only_dynamics=true: a street barrier ahead is no obstacle, a parked car is."""
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    try:
        env.reset(seed=0)
        _place_ahead(carla_double, env.backend, "static.prop.streetbarrier", 8)
        _, _, _, _, info = env.step(np.zeros(2, np.float32))
        assert math.isinf(info["obstacle_distance"])
        _place_ahead(carla_double, env.backend, "vehicle.audi.tt", 15)
        _, _, _, _, info = env.step(np.zeros(2, np.float32))
        # the gap between the bumpers: 15 m between the centres less two 2.4 m half-lengths
        assert info["obstacle_distance"] == pytest.approx(15 - 2 * 2.4, abs=0.3)
    finally:
        env.close()


def test_a_late_obstacle_event_counts_on_the_next_step(tmp_path, carla_double, monkeypatch):
    """As collisions and lane invasions: an event that comes after its step's grace wait is not lost."""
    monkeypatch.setattr(carla_double.World, "_event_delay_s", 0.05)
    monkeypatch.setattr("actors.envs.carla_env.EVENT_GRACE_S", 0.0)
    env = session_env(carla_config(tmp_path, "carla.traffic=[0,0,0]"))
    try:
        env.reset(seed=0)
        _place_ahead(carla_double, env.backend, "vehicle.audi.tt", 15)
        seen = []
        for _ in range(3):
            _, _, _, _, info = env.step(np.zeros(2, np.float32))
            seen.append(info["obstacle_distance"])
            time.sleep(0.2)  # the late events arrive before the next step
        assert any(math.isfinite(d) for d in seen), seen
    finally:
        env.close()
