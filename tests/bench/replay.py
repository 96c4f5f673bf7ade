"""`make bench-replay`: the replay service against its targets, on a real redis-server.

- inserted transitions/s from 1 and from 4 client processes (pipelined, 32-step chunks);
- Redis bytes per stored transition on embedded-env frames and on noisy camera-like frames,
  against 1.25 x the mean lz4-compressed frame + 256 B;
- learner sampling batches/s at batch 256 from the ring vs. a plain in-process numpy gather
  over pre-stacked observations of the same frames;
- insert -> sampleable latency p50/p99 while 2 writers insert.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import lz4.block
import numpy as np

from actors.adder import ChunkAdder
from actors.envs import make_env
from common.chunk import Chunk, encode
from common.config import load_config
from replay_server.client import ReplayClient, connect
from replay_server.ingest import RedisReplay
from replay_server.ring import FrameRing
from replay_server.sampler import sample
from replay_server.server import RedisServer
from tests.bench.report import write_report

KEY = "bench:replay"
CHUNK = 32


def env_chunks(steps: int, noisy: bool = False, seed: int = 0) -> list[Chunk]:
    """Chunks of real embedded-env driving; `noisy` adds camera-like sensor noise to each frame."""
    env = make_env(load_config(overrides=["env.scenario=1"]))
    rng = np.random.default_rng(seed)
    chunks: list[Chunk] = []
    adder = ChunkAdder(actor_id=seed, chunk_steps=CHUNK, sink=chunks.append)

    def look(obs: dict) -> dict:
        if noisy:
            noise = rng.normal(0, 6, obs["image"].shape)
            obs = {**obs, "image": np.clip(obs["image"] + noise, 0, 255).astype(np.uint8)}
        return obs

    obs, _ = env.reset(seed=seed)
    adder.reset(look(obs))
    for _ in range(steps):
        action = np.array([rng.uniform(-0.2, 0.2), rng.uniform(0, 0.6)], np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        adder.add(action, reward, look(obs), terminated, truncated)
        if terminated or truncated:
            obs, _ = env.reset()
            adder.reset(look(obs))
    adder.flush()
    env.close()
    return chunks


def _writer(url: str, payloads: list[tuple[bytes, int]], repeat: int, out: mp.Queue, rate_hz: float = 0.0) -> None:
    client = ReplayClient(connect(url), KEY, max_chunks=100_000)
    sent = 0
    start = time.perf_counter()
    for _ in range(repeat):
        for payload, steps in payloads:
            client.pending.append((payload, steps))
            if len(client.pending) >= 16 or rate_hz:
                client.flush()
            sent += steps
            if rate_hz:
                time.sleep(1.0 / rate_hz)
    client.flush()
    out.put((sent, time.perf_counter() - start))


def insert_rate(url: str, payloads: list[tuple[bytes, int]], processes: int, repeat: int) -> float:
    connect(url).delete(KEY)
    queue: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_writer, args=(url, payloads, repeat, queue)) for _ in range(processes)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    return sum(n for n, _ in results) / elapsed


def bytes_per_transition(url: str, chunks: list[Chunk]) -> tuple[float, float]:
    """(Redis bytes per stored transition, mean lz4-compressed frame)."""
    r = connect(url)
    r.delete(KEY)
    client = ReplayClient(r, KEY, max_chunks=100_000)
    for c in chunks:
        client.insert(c)
    stored = r.memory_usage(KEY, samples=0)
    transitions = sum(c.steps for c in chunks)
    frames = [f for c in chunks for f in c.frames]
    mean_frame = float(np.mean([len(lz4.block.compress(f.tobytes(), store_size=False)) for f in frames]))
    return stored / transitions, mean_frame


def sampling_ratio(chunks: list[Chunk], batch: int = 256, n: int = 200) -> tuple[float, float]:
    ring = FrameRing(capacity=sum(c.steps for c in chunks))
    for c in chunks:
        ring.add_chunk(c)
    idx_all = np.arange(len(ring))
    pre = ring.gather(idx_all)  # the same frames, stacked once in memory: the in-process baseline
    obs, nxt = np.ascontiguousarray(pre["image"]), np.ascontiguousarray(pre["next_image"])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(n):
        sample(ring, batch, rng)
    ours = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        i = rng.integers(0, len(obs), batch)
        obs[i], nxt[i], pre["vector"][i], pre["next_vector"][i], pre["action"][i], pre["reward"][i], pre["done"][i]
    baseline = n / (time.perf_counter() - start)
    return ours, baseline


def latency(url: str, payloads: list[tuple[bytes, int]], seconds: float = 4.0) -> tuple[float, float]:
    r = connect(url)
    r.delete(KEY)
    queue: mp.Queue = mp.Queue()
    repeat = max(1, int(seconds * 100 / len(payloads)))
    writers = [mp.Process(target=_writer, args=(url, payloads, repeat, queue, 100.0)) for _ in range(2)]
    for w in writers:
        w.start()
    replay = RedisReplay(r, KEY, FrameRing(200_000), 1 << 24)
    lat: list[float] = []
    while any(w.is_alive() for w in writers) or lat == []:
        reply = r.xread({KEY: replay.last_id}, count=256, block=5)
        for _, entries in reply:
            replay._ingest(entries)
            now_ms = time.time() * 1000
            lat += [now_ms - int(eid.split(b"-")[0]) for eid, _ in entries]
    for _ in writers:
        queue.get()
    for w in writers:
        w.join()
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def run() -> dict[str, float | str]:
    real = env_chunks(2048)
    noisy = env_chunks(512, noisy=True, seed=1)
    payloads = [(encode(c), c.steps) for c in real]
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), aof=True) as server:
        url = server.url
        rate1 = insert_rate(url, payloads, 1, repeat=8)
        rate4 = insert_rate(url, payloads, 4, repeat=4)
        bpt_real, frame_real = bytes_per_transition(url, real)
        bpt_noisy, frame_noisy = bytes_per_transition(url, noisy)
        p50, p99 = latency(url, payloads)
    ours, baseline = sampling_ratio(real)
    return {
        "replay_insert_transitions_per_s_1_client": rate1,
        "replay_insert_transitions_per_s_4_clients": rate4,
        "replay_bytes_per_transition_env_frames": bpt_real,
        "replay_bytes_per_transition_target_env_frames": 1.25 * frame_real + 256,
        "replay_mean_compressed_frame_env": frame_real,
        "replay_bytes_per_transition_noisy_frames": bpt_noisy,
        "replay_bytes_per_transition_target_noisy_frames": 1.25 * frame_noisy + 256,
        "replay_mean_compressed_frame_noisy": frame_noisy,
        "replay_sample_batches_per_s_b256": ours,
        "replay_numpy_gather_batches_per_s_b256": baseline,
        "replay_sample_vs_gather_ratio": ours / baseline,
        "replay_insert_to_sampleable_ms_p50": p50,
        "replay_insert_to_sampleable_ms_p99": p99,
    }


if __name__ == "__main__":
    write_report("replay", run())
