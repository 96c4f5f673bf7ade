"""The cluster deployment: docker-compose.yml validates (with Compose itself when this machine has
it; no Docker engine is needed for that) and keeps its promises: a password-protected, unpublished
Redis, GPUs reserved, published ports on localhost, non-root images; the Makefile targets and the
cluster page (docs/cluster.md) agree with it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from learner.distributed import worker_cpus

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"REDIS_PASSWORD": "test-password", "RAY_AUTH_TOKEN": "test-token"}


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def _compose_config() -> dict:
    """The resolved compose file: from Compose when installed, else our own parse of the YAML."""
    cmd = _compose_command()
    if cmd is None:
        return yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = {**os.environ, **SECRETS}
    out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@pytest.mark.skipif(_compose_command() is None, reason="no docker compose / docker-compose on this machine")
def test_compose_refuses_to_start_without_the_secrets():
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    out = subprocess.run([*_compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and "REDIS_PASSWORD" in out.stderr


def test_compose_file_keeps_its_promises():
    services = _compose_config()["services"]
    assert set(services) == {"redis", "learner", "carla-worker", "tensorboard"}
    redis = services["redis"]
    assert "ports" not in redis, "the replay Redis is never published to the host"
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--requirepass" in command and "--appendonly yes" in command
    for name in ("learner", "carla-worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
        env = services[name]["environment"]
        assert {"REDIS_PASSWORD", "RAY_AUTH_TOKEN"} <= set(env) and env["RAY_AUTH_MODE"] == "token"
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):  # compose v2 long form
                published[port["target"]] = port.get("host_ip", "")
            else:
                host_ip, _, target = str(port).split("/")[0].rpartition(":")
                published[int(target)] = host_ip.rsplit(":", 1)[0]
    assert set(published) == {6006, 8265}
    assert all(ip in ("127.0.0.1", "${TENSORBOARD_BIND:-127.0.0.1}", "${DASHBOARD_BIND:-127.0.0.1}")
               for ip in published.values()), published
    assert services["learner"]["stop_signal"] == "SIGINT", "stopping the learner must checkpoint"
    text = (ROOT / "docker-compose.yml").read_text()
    for var in set(re.findall(r"\$\{(\w+)", text)) - {"HOST_UID", "HOST_GID"}:
        assert re.search(rf"^{var}=", (ROOT / ".env.example").read_text(), re.M), f"{var} missing from .env.example"


def test_images_run_as_non_root_and_entrypoints_exist():
    learner = (ROOT / "deploy/docker/learner.Dockerfile").read_text()
    actor = (ROOT / "deploy/docker/actor.Dockerfile").read_text()
    assert actor.startswith("#") and "FROM carlasim/carla:0.9.16" in actor
    assert re.findall(r"^USER (\S+)", learner, re.M)[-1] == "avtd3"
    assert re.findall(r"^USER (\S+)", actor, re.M)[-1] == "carla"
    for script in ("learner-entrypoint.sh", "actor-entrypoint.sh"):
        path = ROOT / "deploy/docker" / script
        assert os.access(path, os.X_OK), script
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0, script
    entry = (ROOT / "deploy/docker/learner-entrypoint.sh").read_text()
    assert "deploy/configs/carla.yaml" in entry and "--resume latest" in entry and "--ray-address auto" in entry
    assert '--resources="{\\"carla\\": ${CARLA_SLOTS:-1}}"' in (ROOT / "deploy/docker/actor-entrypoint.sh").read_text()
    cfg = load_config(ROOT / "deploy/configs/carla.yaml")
    assert cfg.env.backend == "carla" and cfg.actors.resources == {"carla": 1.0} and cfg.carla.launch


def test_a_carla_worker_has_the_cpus_its_actors_reserve():
    """Ray places an actor only on a node with its CPUs free: the default WORKER_CPUS covers
    CARLA_SLOTS actors of the CARLA config, each with its own CPU and one per server it launches."""
    env = dict(re.findall(r"^(\w+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    compose = (ROOT / "docker-compose.yml").read_text()
    for var in ("WORKER_CPUS", "CARLA_SLOTS"):
        assert f"${{{var}:-{env[var]}}}" in compose, f"docker-compose.yml's default {var} is .env.example's"
    cfg = load_config(ROOT / "deploy/configs/carla.yaml")
    assert float(env["WORKER_CPUS"]) >= int(env["CARLA_SLOTS"]) * worker_cpus(cfg, cfg.actors.envs_per_actor)


def test_actor_image_brings_a_python_the_carla_wheel_exists_for():
    """Ubuntu 20.04's python3 is 3.8, for which carla 0.9.16 and our pins have no wheels: the image
    copies Python 3.10-3.12 from a build stage and makes its venv with it."""
    actor = (ROOT / "deploy/docker/actor.Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?", actor, re.M)
    assert stages[-1][0] == "carlasim/carla:0.9.16"
    image, name = stages[0]
    assert image == "${PYTHON_IMAGE}" and name, image
    version = re.fullmatch(r"python:3\.(\d+)\.\d+-slim-bullseye", _python_image(actor))
    assert version and 10 <= int(version.group(1)) <= 12, _python_image(actor)
    assert re.search(rf"^COPY --from={name} /usr/local/bin/", actor, re.M)
    assert re.search(r"/usr/local/bin/python3 -m venv /opt/venv", actor)
    assert not re.search(r"apt-get install[^\n]*\bpython3\b", actor), "the system python3 (3.8) must not be used"
    # The 0.9.16 image keeps CARLA under /workspace; the build checks the path the config uses:
    # the binary itself (CarlaUE4.sh would run it as a child, out of reach of the parent-death
    # signal), with the project name the script passes it first.
    binary = "/workspace/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping"
    assert f"RUN test -f {binary}" in actor and f"chmod +x {binary}" in actor
    for cfg in (load_config(), load_config(ROOT / "deploy/configs/carla.yaml")):
        assert cfg.carla.server_command.split()[:2] == [binary, "CarlaUE4"]


def test_actor_image_runs_ray_on_the_venv_python():
    """The carla-worker's processes (the entrypoint's `ray start`, hence Ray's workers and our
    actors) run the /opt/venv Python 3.1x, not the image's python3 3.8: the venv made with the
    copied Python is first on PATH for good, and the entrypoint finds `ray` through PATH."""
    import json
    import shlex

    actor = (ROOT / "deploy/docker/actor.Dockerfile").read_text()
    assert re.search(r"^RUN /usr/local/bin/python3 -m venv /opt/venv\b", actor, re.M)
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for line in re.findall(r"^ENV (.*)$", actor, re.M):  # ENV k=v ...; later lines win, $PATH expands
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env[key] = value.replace("$PATH", env["PATH"]).replace("${PATH}", env["PATH"])
    assert env["PATH"].split(":")[0] == "/opt/venv/bin" and env.get("VIRTUAL_ENV") == "/opt/venv", env
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.*)$", actor, re.M)
    script = json.loads(entrypoint)[0]
    assert not re.search(r"^CMD ", actor, re.M)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["carla-worker"]
    assert "entrypoint" not in compose and "command" not in compose, "compose keeps the image's entrypoint"
    text = (ROOT / script).read_text()
    assert re.search(r"^exec (/opt/venv/bin/)?ray start\b", text, re.M), "the entrypoint starts ray from the venv"
    assert not re.search(r"(^|[\s/])python3?(\.\d+)?\s", text), "no other python in the entrypoint"

def _gpu_request(service: dict) -> dict:
    (request,) = service["deploy"]["resources"]["reservations"]["devices"]
    return request


def test_gpus_are_mapped_not_all_gpu_0():
    """Docker turns `count: 1` into NVIDIA_VISIBLE_DEVICES=0 for every container, and replicas of
    one service cannot differ: the learner names its GPU, workers see all of the host's, and the
    CARLA servers spread over CARLA_GPUS (carla.gpus) by env slot; Ray keeps off those GPUs."""
    services = _compose_config()["services"]
    learner, worker = _gpu_request(services["learner"]), _gpu_request(services["carla-worker"])
    assert "count" not in learner and learner["device_ids"] in (["${LEARNER_GPU:-0}"], ["0"]), learner
    assert worker.get("count") in ("all", -1) and "device_ids" not in worker, worker
    assert "CARLA_GPUS" in services["learner"]["environment"]
    actor = (ROOT / "deploy/docker/actor-entrypoint.sh").read_text()
    assert "--num-gpus=0" in actor


@pytest.mark.parametrize("gpus, expected", [("1,2,3", [1, 2, 3]), ("", [])])
def test_learner_entrypoint_passes_carla_gpus(tmp_path, gpus, expected):
    """The entrypoint, run with `ray` and `python` stand-ins, turns CARLA_GPUS into carla.gpus and
    LEARNER_GPU into carla.learner_gpu."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("ray", "exit 0"), ("python", 'printf "%s\\n" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CARLA_GPUS": gpus, "LEARNER_GPU": "2", "REDIS_PASSWORD": "x"}
    out = subprocess.run(["sh", str(ROOT / "deploy/docker/learner-entrypoint.sh")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=30)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    carla = load_config(ROOT / "deploy/configs/carla.yaml", overrides).carla
    assert carla.gpus == expected and carla.learner_gpu == 2


def test_carla_workers_run_an_init_that_reaps_orphans():
    assert _compose_config()["services"]["carla-worker"].get("init") is True


def test_makefile_and_the_cluster_page_describe_the_same_cluster():
    make = (ROOT / "Makefile").read_text()
    for target in ("up", "down", "logs", "scale"):
        assert re.search(rf"^{target}:", make, re.M), target
    section = (ROOT / "docs" / "cluster.md").read_text()
    for text in ("NVIDIA Container Toolkit", "cp .env.example .env", "make up", "make logs", "make scale N=",
                 "make down", "127.0.0.1:6006", "127.0.0.1:8265", "--resume latest", "redis", "learner",
                 "carla-worker", "tensorboard", "LEARNER_GPU", "CARLA_GPUS", "carla.gpus", "-graphicsadapter"):
        assert text in section, text



def test_make_scale_keeps_the_actor_count_in_env(tmp_path):
    """`make scale N=4` in a copy of the project: 4 workers, 3 actors written to .env."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    no_env = subprocess.run(["make", "scale", "N=4", "COMPOSE=echo compose"], capture_output=True, text=True, cwd=tmp_path)
    assert no_env.returncode != 0 and "no .env" in no_env.stderr
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    out = subprocess.run(["make", "scale", "N=4", "COMPOSE=echo compose"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "compose up -d --no-recreate --scale carla-worker=4" in out.stdout  # the learner keeps training
    assert "NUM_ACTORS=3" in (tmp_path / ".env").read_text().splitlines()
    up = subprocess.run(["make", "-n", "up", "COMPOSE=compose"], capture_output=True, text=True, cwd=tmp_path)
    assert "--scale carla-worker=$(( 3 + 1 ))" in up.stdout


def _python_image(dockerfile: str) -> str:
    """The default of the Dockerfile's PYTHON_IMAGE build arg."""
    return re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M).group(1)


def test_both_images_build_on_one_python_to_the_patch():
    """Ray refuses a node whose Python differs from the head's at the patch level
    (RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL, "patch" by default): both images start from one
    PYTHON_IMAGE, pinned to a patch release (a floating tag moves), and compose builds both with
    the same value."""
    learner = (ROOT / "deploy/docker/learner.Dockerfile").read_text()
    actor = (ROOT / "deploy/docker/actor.Dockerfile").read_text()
    assert _python_image(learner) == _python_image(actor)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", _python_image(learner)), "pinned to the patch"
    assert re.findall(r"^FROM (\S+)", learner, re.M) == ["${PYTHON_IMAGE}"]
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    args = [services[s]["build"]["args"] for s in ("learner", "carla-worker")]
    assert args[0] == args[1] == {"PYTHON_IMAGE": _python_image(learner)}
    for dockerfile in (learner, actor):  # the check stays at the patch level: a drift fails at the join
        assert not re.search(r"^ENV .*RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", dockerfile, re.M)
    assert all("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL" not in s.get("environment", {}) for s in services.values())


def test_compose_checks_the_health_of_the_learner_and_the_workers():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, role in (("learner", "head"), ("carla-worker", "worker")):
        assert services[name]["healthcheck"]["test"] == ["CMD", "python", "deploy/docker/healthcheck.py", role]
    assert services["carla-worker"]["depends_on"] == {"learner": {"condition": "service_healthy"}}
    assert subprocess.run([sys.executable, str(ROOT / "deploy/docker/healthcheck.py")]).returncode == 2
