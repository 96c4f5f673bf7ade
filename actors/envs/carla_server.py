"""One CARLA server per env: launched by us and relaunched when it hangs or dies, or an external one
we connect to and wait for.

Env slot i (rollout actors 0..n-1, then the evaluator) uses RPC port `port + 4i` (streaming +1,
secondary +2) and Traffic Manager port `tm_port + i`, so several actors on one node never collide.
With `gpus` set, slot i renders on GPU `gpus[i % len(gpus)]`, else on the node's GPUs but the
learner's (`carla_gpus`); with `server_cpus` set, it runs on that many CPUs (its affinity,
inherited by every process and thread of the server).
A launched server runs in its own process group, which is killed as a whole; its stdout and
stderr go to `<log_dir>/carla_<slot>.log`, its own log included (`carla_diagnosis.LOG_FLAGS`). A
launch that exits before answering is relaunched until it has failed the same way
`max_start_failures` times; the error then quotes the log and names the likely causes.

A killed actor (SIGKILL, Ray's `ray.kill`) cannot kill its server itself: the server gets SIGKILL
from the kernel when the actor dies (the parent-death signal set before exec). That reaches the
program we start, so `server_command` starts the server binary itself
(CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping CarlaUE4), not CarlaUE4.sh: the script starts
the binary as a child without exec, and the signal would kill only the script. For a command that is
a script all the same, every launched server carries its owner (pid and start time) in its
environment, which all its processes inherit, and every launch first kills the servers on the node
whose owner is gone.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from actors.envs.carla_diagnosis import LOG_FLAGS, explain, likely_causes
from actors.envs.carla_gpus import server_adapters
from common.config import CarlaConfig
from common.errors import ServiceUnavailable
from replay_server.server import die_with_parent

log = logging.getLogger(__name__)

PORTS_PER_SERVER = 4
SLOT_SPAN = 64
"""A launched server whose ports are taken moves on by this many slots, past every other env's block."""
MAX_PORT_TRIES = 8
OWNER_ENV = "AV_TD3_CARLA_OWNER"
"""Environment variable naming the process that launched a server, as `pid:start time`."""


class CarlaUnavailable(ServiceUnavailable):
    """No CARLA server answered at an address before the deadline."""


class CarlaExited(CarlaUnavailable):
    """A launched server exited before it answered; `signature` tells one failure from another."""

    def __init__(self, message: str, signature: tuple) -> None:
        super().__init__(message)
        self.signature = signature


@dataclass(frozen=True)
class Ports:
    rpc: int
    streaming: int
    secondary: int
    tm: int


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def allocate_ports(cfg: CarlaConfig, slot: int, free=port_free) -> Ports:
    """The ports of env `slot`. A launched server skips a block another process holds; when
    connecting, the RPC port is the given server's and only our Traffic Manager port must be free."""
    for k in range(MAX_PORT_TRIES if cfg.launch else 1):
        block = slot + k * SLOT_SPAN
        rpc = cfg.port + PORTS_PER_SERVER * block
        ports = Ports(rpc, rpc + 1, rpc + 2, cfg.tm_port + block)
        needed = (ports.rpc, ports.streaming, ports.secondary, ports.tm) if cfg.launch else (ports.tm,)
        if all(free(p) for p in needed):
            return ports
    raise CarlaUnavailable(
        f"no free ports for CARLA env {slot}: tried RPC {cfg.port + PORTS_PER_SERVER * slot} and "
        f"{MAX_PORT_TRIES - 1 if cfg.launch else 0} more blocks, TM {cfg.tm_port + slot}; "
        "free them or set carla.port / carla.tm_port"
    )


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22), which tells
    it from a later process given the same pid; None for no such process, or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # from field 3, the state, on
    return None if fields[0] == "Z" else fields[19]


def owner_tag() -> str:
    """This process, as the owner of the servers it launches."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _owner_alive(tag: str) -> bool:
    pid, _, start = tag.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == start


def reap_orphans(wait_s: float = 5.0) -> list[int]:
    """Kills every process of a launched server whose owner is gone (a SIGKILLed actor's, when
    `server_command` is a script like CarlaUE4.sh: the script died with it, the binary did not, or
    what the server itself started) and waits until they are gone, so that their ports are free
    again; returns their pids. Servers of live owners are left alone, those of
    other users cannot be read."""
    prefix = f"{OWNER_ENV}=".encode()
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        tag = next((v[len(prefix):].decode() for v in environ.split(b"\0") if v.startswith(prefix)), None)
        if tag is None or _owner_alive(tag):
            continue
        try:
            os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        killed.append(int(entry))
    if killed:
        log.warning("killed %d processes of CARLA servers whose actor is gone: %s", len(killed), killed)
    deadline = time.monotonic() + wait_s
    while any(_start_time(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def _in_child(cpus: set[int] | None) -> None:
    """preexec_fn of a launched server: it gets SIGKILL when its actor dies (a server without its
    actor has nothing to save, and a hung one may ignore SIGTERM), and runs on `cpus` when given
    (set before exec, so the server and all its threads inherit them)."""
    die_with_parent(signal.SIGKILL)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


_launcher: ThreadPoolExecutor | None = None
_launcher_lock = threading.Lock()


def _popen(*args, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` from a thread that lives as long as this process. The parent-death
    signal fires when the *thread* that forked the server ends, not the process: a server launched
    from a short-lived thread would be killed with that thread. Ray runs a default actor's methods
    (max_concurrency 1, no concurrency groups, as ours) and the serial learner runs its envs on the
    main thread, which is used directly; any other thread hands the launch to one launcher thread,
    which never ends before the process does."""
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(*args, **kwargs)
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = ThreadPoolExecutor(1, thread_name_prefix="carla-launcher")
    return _launcher.submit(subprocess.Popen, *args, **kwargs).result()


class CarlaServer:
    """The server behind one env; `restarts` counts relaunches (hangs, deaths, scheduled)."""

    def __init__(self, cfg: CarlaConfig, slot: int) -> None:
        self.cfg = cfg
        self.slot = slot
        if cfg.launch:
            # An orphan of this slot holds its ports: free them before choosing. Once only: a
            # relaunch (`restart`) kills this server's own process group, binary included.
            reap_orphans()
        self.ports = allocate_ports(cfg, slot)
        self.log_path = Path(cfg.log_dir) / f"carla_{slot}.log"
        self.process: subprocess.Popen | None = None
        self.launched_at = 0  # where this launch's output starts in the log
        self.restarts = 0

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.ports.rpc}"

    @property
    def gpu(self) -> int | None:
        """The Vulkan adapter this env's server renders on; None leaves the choice to the engine."""
        gpus = self.cfg.gpus or (server_adapters(self.cfg.learner_gpu) if self.cfg.launch else [])
        return gpus[self.slot % len(gpus)] if gpus else None

    @property
    def cpus(self) -> set[int] | None:
        """The CPUs this env's launched server is pinned to, `server_cpus` of those this process may
        use, taken by slot like `gpus`; None leaves it unpinned."""
        n = self.cfg.server_cpus
        if not n:
            return None
        allowed = sorted(os.sched_getaffinity(0))
        return {allowed[(self.slot * n + i) % len(allowed)] for i in range(n)}

    def command(self) -> list[str]:
        """`server_command` with the town right after its program (its last word that is not a
        flag: `CarlaUE4-Linux-Shipping CarlaUE4 /Game/Carla/Maps/Town01 -RenderOffScreen` for the
        binary, which takes the project name first), where UE4 reads the map to boot: otherwise
        CARLA boots its default town and the client loads ours on top, minutes on a cold server.
        Then the port and option flags, and the flags that send the server's log to its stdout."""
        # Without an adapter every server of a node renders on the same GPU. CARLA's docs (0.9.16,
        # adv_multigpu) set the r.GraphicsAdapter console variable from the command line; UE4's
        # Vulkan RHI also reads -graphicsadapter=N, which overrides it. Both name the same index.
        adapter = [] if self.gpu is None else [
            f"-graphicsadapter={self.gpu}", f"-ini:[/Script/Engine.RendererSettings]:r.GraphicsAdapter={self.gpu}"]
        c = self.cfg
        threads = [f"-{flag}={n}" for flag, n in (("RPCThreads", c.server_rpc_threads),
                                                  ("StreamingThreads", c.server_streaming_threads)) if n]
        words = shlex.split(c.server_command)
        program = max((i for i, w in enumerate(words) if not w.startswith("-")), default=0) + 1
        given = {w.lower() for w in words}
        return words[:program] + [f"/Game/Carla/Maps/{c.town}"] + words[program:] + [
            f"-carla-rpc-port={self.ports.rpc}",
            f"-carla-streaming-port={self.ports.streaming}",
            f"-carla-secondary-port={self.ports.secondary}",
            f"-quality-level={c.quality_level}",
        ] + adapter + threads + [f for f in LOG_FLAGS if f.lower() not in given]

    def start(self) -> None:
        """Launches the server (or, for an external one, waits for it) until it answers; a launch
        that exits first is retried until one way of failing has come `max_start_failures` times."""
        failures: Counter = Counter()
        while True:
            try:
                self._launch()
                self.wait_ready()
                return
            except CarlaExited as exc:
                failures[exc.signature] += 1
                if failures[exc.signature] >= self.cfg.max_start_failures:
                    raise CarlaUnavailable(f"{exc}\ngave up after {failures[exc.signature]} launches that failed "
                                           "this way (carla.max_start_failures)") from exc
                log.warning("CARLA env %d: %s; launching again", self.slot, str(exc).splitlines()[0])

    def _launch(self) -> None:
        if self.cfg.launch:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            cpus, command = self.cpus, self.command()
            pinned = "" if cpus is None else f" on CPUs {sorted(cpus)}"
            with open(self.log_path, "ab") as out:
                self.launched_at = out.tell()
                out.write(f"\n--- launch {time.strftime('%Y-%m-%d %H:%M:%S')}{pinned}: {shlex.join(command)}\n".encode())
                out.flush()
                try:
                    self.process = _popen(
                        command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        env={**os.environ, OWNER_ENV: owner_tag()}, start_new_session=True,
                        preexec_fn=functools.partial(_in_child, cpus),
                    )
                except OSError as exc:
                    raise CarlaUnavailable(
                        f"carla.server_command '{self.cfg.server_command}' cannot be started on this node: {exc}; "
                        "point it at CARLA's CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping, "
                        "or set carla.launch=false to connect to running servers"
                    ) from exc
            log.info("CARLA server for env %d launched (pid %d) on %s%s, log %s",
                     self.slot, self.process.pid, self.address, pinned, self.log_path)

    def wait_ready(self) -> None:
        """Polls the server with back-off until it answers; a launched server that exits, or no
        answer before `start_timeout_s`, raises `CarlaUnavailable` naming the address."""
        carla = importlib.import_module("carla")
        deadline = time.monotonic() + self.cfg.start_timeout_s
        delay, last = 0.2, ""
        while True:
            if self.process is not None and self.process.poll() is not None:
                code, output = self.process.returncode, self.log_tail(200_000, since=self.launched_at)
                self.kill()  # what the server started (its process group) goes with it
                raise CarlaExited(
                    f"CARLA server for env {self.slot} ({self.address}) exited with code {code} before answering; "
                    f"its log ({self.log_path}) ends:\n{output[-2000:]}\n{explain(output, code)}",
                    (code, tuple(likely_causes(output, code))))
            try:
                client = carla.Client(self.cfg.host, self.ports.rpc, worker_threads=self.cfg.client_worker_threads)
                client.set_timeout(min(self.cfg.timeout_s, 5.0))
                client.get_server_version()
                return
            except RuntimeError as exc:
                last = str(exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise CarlaUnavailable(
                    f"no CARLA server answered at {self.address} within {self.cfg.start_timeout_s:.0f} s "
                    f"(last error: {last})" + (f"; its log ends:\n{self.log_tail()}" if self.cfg.launch else "")
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    def restart(self, reason: str) -> None:
        """Kills a launched server's process group and launches it again; an external server is
        waited for (whoever runs it must restart it)."""
        self.restarts += 1
        log.warning("CARLA env %d: %s; %s the server at %s (restart %d)", self.slot, reason,
                    "relaunching" if self.cfg.launch else "waiting for", self.address, self.restarts)
        self.kill()
        self.start()

    def kill(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 2000, since: int = 0) -> str:
        """The last `chars` of the log, from byte `since` on (a launch's own output)."""
        if not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - 4 * chars))
            return f.read().decode(errors="replace")[-chars:]
