"""The actors' side of the replay service: encoded chunks appended to a Redis stream.

Inserts never block an actor for long: when Redis is unreachable the client keeps up to
`buffer_chunks` encoded chunks and retries with exponential back-off on later inserts; beyond
the bound the oldest chunk is dropped, counted and logged. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlparse

import redis

from common.chunk import Chunk, encode

log = logging.getLogger(__name__)

STATS_SUFFIX = ":stats"


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client for `url`; the password comes from the URL or else from REDIS_PASSWORD."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"replay.redis_url '{url}' must start with redis://, rediss:// or unix://")
    password = None if parsed.password else os.environ.get("REDIS_PASSWORD") or None
    return redis.Redis.from_url(
        url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
    )


@dataclass
class ClientCounters:
    chunks_inserted: int = 0
    transitions_inserted: int = 0
    chunks_dropped: int = 0
    transitions_dropped: int = 0
    send_failures: int = 0


class ReplayClient:
    """Pipelined XADDs of encoded chunks with bounded buffering while Redis is away."""

    def __init__(
        self,
        client: redis.Redis,
        stream_key: str,
        max_chunks: int,
        buffer_chunks: int = 1024,
        backoff_s: tuple[float, float] = (0.1, 10.0),
    ) -> None:
        self.client = client
        self.stream_key = stream_key
        self.max_chunks = max_chunks
        self.buffer_chunks = buffer_chunks
        self.backoff_min, self.backoff_max = backoff_s
        self.pending: deque[tuple[bytes, int]] = deque()
        self.counters = ClientCounters()
        self._backoff = self.backoff_min
        self._next_try = 0.0

    def insert(self, chunk: Chunk) -> None:
        """Queues one chunk and sends whatever is queued, unless a retry is not due yet."""
        self.insert_encoded(encode(chunk), chunk.steps)

    def insert_encoded(self, payload: bytes, steps: int) -> None:
        self.pending.append((payload, steps))
        while len(self.pending) > self.buffer_chunks:
            _, lost = self.pending.popleft()
            self.counters.chunks_dropped += 1
            self.counters.transitions_dropped += lost
            log.warning("replay buffer full (%d chunks) while Redis is unreachable: dropped a chunk of %d steps "
                        "(%d chunks dropped so far)", self.buffer_chunks, lost, self.counters.chunks_dropped)
        if time.monotonic() >= self._next_try:
            self.flush()

    def flush(self) -> bool:
        """Sends every queued chunk in one pipeline; True when nothing is left queued."""
        if not self.pending:
            return True
        batch = list(self.pending)
        pipe = self.client.pipeline(transaction=False)
        for payload, _ in batch:
            pipe.xadd(self.stream_key, {"c": payload}, maxlen=self.max_chunks, approximate=False)
        steps = sum(s for _, s in batch)
        pipe.hincrby(self.stream_key + STATS_SUFFIX, "chunks", len(batch))
        pipe.hincrby(self.stream_key + STATS_SUFFIX, "transitions", steps)
        try:
            pipe.execute()
        except redis.exceptions.AuthenticationError as exc:
            raise RuntimeError(f"Redis refused the replay client's credentials ({exc}); set the password in "
                               "replay.redis_url or REDIS_PASSWORD") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.counters.send_failures += 1
            self._next_try = time.monotonic() + self._backoff
            log.warning("replay insert failed (%s); %d chunks buffered, retrying in %.1fs", exc, len(self.pending), self._backoff)
            self._backoff = min(self._backoff * 2, self.backoff_max)
            return False
        for _ in batch:
            self.pending.popleft()
        self.counters.chunks_inserted += len(batch)
        self.counters.transitions_inserted += steps
        self._backoff = self.backoff_min
        self._next_try = 0.0
        return True
