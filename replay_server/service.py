"""Where actors' chunks go and how they reach the learner's ring: straight in (serial mode), or
through a Redis stream (the replay service). Both give the learner the same `FrameRing`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol

from common.chunk import Chunk
from common.config import Config
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


class RedisReplayService:
    """Chunks go to a Redis stream, launched here or attached by URL; the ring reads it back."""

    def __init__(self, cfg: Config, run_dir: Path, ring: FrameRing) -> None:
        r = cfg.replay
        self.server: RedisServer | None = None
        url = r.redis_url
        if not url:
            self.server = RedisServer(run_dir / "redis", aof=r.aof).start()
            url = self.server.url
            log.info("replay service: redis-server on %s (data in %s)", url, self.server.directory)
        self.url = url
        self.redis = connect(url)
        self.ring = ring
        self.client = ReplayClient(
            self.redis, r.stream_key, max_chunks=math.ceil(r.capacity / r.chunk_steps), buffer_chunks=r.client_buffer_chunks
        )
        self.ingest = RedisReplay(self.redis, r.stream_key, ring, r.max_chunk_bytes)
        restored = self.ingest.warm_start()
        if restored:
            log.info("replay service: %d transitions already in %s", restored, r.stream_key)

    def insert(self, chunk: Chunk) -> None:
        self.client.insert(chunk)

    def poll(self) -> int:
        return self.ingest.poll()

    def metrics(self) -> dict[str, float]:
        c, i = self.client.counters, self.ingest.counters
        return {
            "replay/size": len(self.ring),
            "replay/inserted": c.transitions_inserted,
            "replay/dropped": c.transitions_dropped,
            "replay/send_failures": c.send_failures,
            "replay/ingested": i.transitions,
            "replay/duplicates": i.duplicates,
            "replay/skipped": i.skipped_foreign + i.skipped_undecodable + i.skipped_oversized,
        }

    def close(self) -> None:
        self.client.flush()
        self.redis.close()
        if self.server is not None:
            self.server.stop()


def open_replay(cfg: Config, run_dir: Path, ring: FrameRing, via_redis: bool) -> Replay:
    return RedisReplayService(cfg, run_dir, ring) if via_redis else LocalReplay(ring)
