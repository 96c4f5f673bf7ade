"""The learner's side of the replay service: the Redis stream copied into a local `FrameRing`.

`warm_start()` reads everything already in the stream (after a learner restart nothing that
Redis kept is lost), `poll()` reads what arrived since, without blocking. Entries that are not
chunks, do not decode, carry another schema version or exceed `max_chunk_bytes` are skipped
and counted, never fatal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from common.chunk import ChunkError, decode
from replay_server.ring import FrameRing

log = logging.getLogger(__name__)

PAGE = 256


@dataclass
class IngestCounters:
    chunks: int = 0
    transitions: int = 0
    duplicates: int = 0
    skipped_foreign: int = 0
    skipped_undecodable: int = 0
    skipped_oversized: int = 0


class RedisReplay:
    """Copies chunks from the stream at `stream_key` into `ring`."""

    def __init__(self, client: redis.Redis, stream_key: str, ring: FrameRing, max_chunk_bytes: int) -> None:
        self.client = client
        self.stream_key = stream_key
        self.ring = ring
        self.max_chunk_bytes = max_chunk_bytes
        self.last_id = b"0-0"
        self.counters = IngestCounters()

    def _ingest(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        added = 0
        for entry_id, fields in entries:
            self.last_id = entry_id
            payload = fields.get(b"c")
            if payload is None:
                self.counters.skipped_foreign += 1
                log.warning("replay entry %s has no chunk field: skipped", entry_id)
                continue
            if len(payload) > self.max_chunk_bytes:
                self.counters.skipped_oversized += 1
                log.warning("replay entry %s is %d bytes, over replay.max_chunk_bytes: skipped", entry_id, len(payload))
                continue
            try:
                chunk = decode(payload, self.ring.vector.shape[1])
            except ChunkError as exc:
                self.counters.skipped_undecodable += 1
                log.warning("replay entry %s skipped: %s", entry_id, exc)
                continue
            if not self.ring.add_chunk(chunk):
                self.counters.duplicates += 1
                continue
            self.counters.chunks += 1
            self.counters.transitions += chunk.steps
            added += chunk.steps
        return added

    def warm_start(self) -> int:
        """Ingests every entry after `last_id` already in the stream; returns transitions added."""
        added = 0
        while True:
            entries = self.client.xrange(self.stream_key, min=f"({self.last_id.decode()}", count=PAGE)
            if not entries:
                return added
            added += self._ingest(entries)

    def poll(self, max_entries: int = 4 * PAGE) -> int:
        """Ingests up to `max_entries` new entries without blocking; returns transitions added."""
        reply = self.client.xread({self.stream_key: self.last_id}, count=max_entries)
        return sum(self._ingest(entries) for _, entries in reply)

