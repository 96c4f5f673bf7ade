"""Where actors' chunks go and how they reach the learner's ring: straight in (serial mode), or
through a Redis stream (the replay service). Both give the learner the same `FrameRing`."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Protocol

import redis

from common.chunk import Chunk
from common.config import Config
from common.errors import ServiceUnavailable
from replay_server.client import ReplayClient, connect
from replay_server.ingest import RedisReplay
from replay_server.ring import FrameRing
from replay_server.server import RedisServer

log = logging.getLogger(__name__)


class Replay(Protocol):
    ring: FrameRing

    def insert(self, chunk: Chunk) -> None:
        """Accepts one chunk from an actor."""

    def poll(self) -> int:
        """Moves newly arrived transitions into the ring; returns how many."""

    def metrics(self) -> dict[str, float]:
        """replay/* counters for the logger."""

    def close(self) -> None:
        """Flushes and releases what the replay started."""


class LocalReplay:
    """Chunks go straight into the ring (one process)."""

    def __init__(self, ring: FrameRing) -> None:
        self.ring = ring
        self.inserted = 0

    def insert(self, chunk: Chunk) -> None:
        if self.ring.add_chunk(chunk):
            self.inserted += chunk.steps

    def poll(self) -> int:
        return 0

    def metrics(self) -> dict[str, float]:
        return {"replay/size": len(self.ring), "replay/inserted": self.inserted}

    def close(self) -> None:
        pass


def wait_for_redis(client: redis.Redis, url: str, timeout_s: float) -> None:
    """Pings with back-off until Redis answers; `ServiceUnavailable` naming the address (never the
    password) after `timeout_s`. A wrong password fails at once: retrying cannot fix it."""
    where = url.rsplit("@", 1)[-1]
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.AuthenticationError as exc:
            raise ServiceUnavailable(f"Redis at {where} refused our password: {exc}") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceUnavailable(
                    f"no Redis answered at {where} within {timeout_s:.0f} s ({exc}); check replay.redis_url / "
                    "--redis-url, or raise replay.connect_timeout_s") from exc
            log.warning("Redis at %s does not answer (%s); retrying in %.1f s", where, exc, min(delay, remaining))
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 5.0)


class RedisReplayService:
    """Chunks go to a Redis stream, launched here or attached by URL; the ring reads it back."""

    def __init__(self, cfg: Config, run_dir: Path, ring: FrameRing) -> None:
        r = cfg.replay
        self.server: RedisServer | None = None
        url = r.redis_url
        if not url:
            self.server = RedisServer(run_dir / "redis", aof=r.aof, fsync=r.aof_fsync).start()
            url = self.server.url
            log.info("replay service: redis-server on %s (data in %s)", url, self.server.directory)
        self.url = url
        self.redis = connect(url)
        wait_for_redis(self.redis, url, r.connect_timeout_s)
        self.ring = ring
        self.client = ReplayClient(
            self.redis, r.stream_key, max_chunks=math.ceil(r.capacity / r.chunk_steps), buffer_chunks=r.client_buffer_chunks
        )
        self.ingest = RedisReplay(self.redis, r.stream_key, ring, r.max_chunk_bytes)
        self.poll_failures = 0
        self.redis_restarts = 0
        self.downtime_s = 0.0
        self._down_since: float | None = None
        self._next_restart = 0.0
        restored = self.ingest.warm_start()
        if restored:
            log.info("replay service: %d transitions already in %s", restored, r.stream_key)

    def insert(self, chunk: Chunk) -> None:
        self.client.insert(chunk)

    def poll(self) -> int:
        """New transitions into the ring. Never raises for an unreachable Redis: the failure is
        counted and the next poll tries again; a redis-server we launched and that died is
        relaunched on its port and data directory, so it comes back with its AOF."""
        if self.server is not None and self.server.process.poll() is not None and time.monotonic() >= self._next_restart:
            self._relaunch()
        try:
            added = self.ingest.poll()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
            self.poll_failures += 1
            if self.poll_failures in (1, 10) or self.poll_failures % 100 == 0:
                log.warning("replay poll failed (%s); %d failures so far, retrying", exc, self.poll_failures)
            return 0
        if self._down_since is not None:
            self.downtime_s += time.monotonic() - self._down_since
            self._down_since = None
        return added

    def _relaunch(self) -> None:
        assert self.server is not None
        log.warning("redis-server (pid %s) died; relaunching it on %s from %s",
                    self.server.process.pid, self.url, self.server.directory)
        try:
            self.server.start()
            self.redis_restarts += 1
        except RuntimeError as exc:
            log.error("redis-server relaunch failed: %s", exc)
            self._next_restart = time.monotonic() + 5.0

    def metrics(self) -> dict[str, float]:
        c, i = self.client.counters, self.ingest.counters
        # "inserted" means the same in every mode: into the learner's ring. What this process sent
        # to Redis only exists where it sends (serial mode); rollout actors report their own.
        sending = {
            "replay/sent": c.transitions_inserted,
            "replay/dropped": c.transitions_dropped,
            "replay/send_failures": c.send_failures,
        } if c.transitions_inserted or c.send_failures else {}
        return {
            "replay/redis_restarts": self.redis_restarts,
            "replay/poll_failures": self.poll_failures,
            "replay/downtime_s": self.downtime_s,
            "replay/size": len(self.ring),
            "replay/inserted": i.transitions,
            "replay/duplicates": i.duplicates,
            "replay/skipped": i.skipped_foreign + i.skipped_undecodable + i.skipped_oversized,
            **sending,
        }

    def close(self) -> None:
        self.client.flush()
        self.redis.close()
        if self.server is not None:
            self.server.stop()


def open_replay(cfg: Config, run_dir: Path, ring: FrameRing, via_redis: bool) -> Replay:
    return RedisReplayService(cfg, run_dir, ring) if via_redis else LocalReplay(ring)
