"""`make bench-replay`: the replay service against its targets, on a real redis-server.

- inserted transitions/s from 1 and from 4 client processes (pipelined, 32-step chunks);
- Redis bytes per stored transition on embedded-env frames and on noisy camera-like frames,
  against 1.25 x the mean lz4-compressed frame + 256 B;
- learner sampling batches/s at batch 256 from the ring vs. a plain in-process numpy gather
  over pre-stacked observations of the same frames;
- insert -> sampleable latency p50/p99 while 2 writers insert;
- prioritized (replay.sampler=per) against uniform batches/s at batch 256 with 100k and 1M slots,
  batches of frame slots (the `replay_on_device` path) and, at the `--host-frames` capacities (100k
  by default), of frame stacks gathered on the host (the default path); and the host memory per
  slot of the priorities beside the ring's own.

`--sections` runs some of these (insert, bytes, sampling, latency, prioritized); a partial run
writes a section of its own (`replay_prioritized`, ...), so the whole table stays.
"""

from __future__ import annotations

import argparse
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
from replay_server.prioritized import PrioritizedSampler
from replay_server.sampler import Sampler, UniformSampler, sample
from replay_server.server import RedisServer
from tests.bench.report import chosen, section, write_report

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


def synthetic_ring(capacity: int, episode_steps: int = 100) -> FrameRing:
    """A full ring that has wrapped, its transitions linked in episodes of `episode_steps` for
    n-step targets, written array-wise (1M `add_chunk` calls would take minutes). Its frames are
    never touched: batches come as frame slots (`images=False`, the learner.replay_on_device path),
    so the comparison is of what the samplers add, not of a 14 MB image copy both pay."""
    ring = FrameRing(capacity)
    g = np.arange(capacity, 2 * capacity)  # live global indices after one wrap
    slot = g % capacity
    ring.frame_ids[slot] = (g[:, None] + np.arange(5)[None, :]) % ring.frame_capacity
    ring.reward[slot] = 1.0
    last = (g + 1) % episode_steps == 0
    ring.done[slot] = last
    ring.successor[slot] = np.where(last, -1, g + 1)
    ring.successor[(2 * capacity - 1) % capacity] = -1
    ring.frames_added, ring.head, ring.tail = 2 * capacity + 5, 2 * capacity, capacity
    return ring


def batches_per_s(ring: FrameRing, sampler: Sampler, batch: int, n: int, inserts: int, images: bool = False) -> float:
    """Batches of `batch` (3-step targets; frame slots, or frame stacks with `images`) per second,
    each followed by its priority update and by `inserts` transitions entering the full ring (the
    sampler follows them)."""
    rng = np.random.default_rng(0)
    td = np.random.default_rng(1).gamma(1.0, 2.0, batch)
    start = time.perf_counter()
    for _ in range(n):
        arrays = sample(ring, batch, rng, n_step=3, images=images, sampler=sampler)
        if sampler.uses_priorities:
            sampler.update_priorities(arrays["indices"], td)
        ring.head += inserts
        ring.tail += inserts
    return n / (time.perf_counter() - start)


def alternate(ring: FrameRing, samplers: tuple[Sampler, Sampler], blocks: int, **kwargs) -> tuple[float, float, float]:
    """The two samplers' batches/s in `blocks` alternating blocks on the same ring: each one's
    median and the median of the block pairs' ratios (second over first), so a burst of load on a
    shared host moves one block, not the figure."""
    rates = np.array([[batches_per_s(ring, s, **kwargs) for s in samplers] for _ in range(blocks)])
    return float(np.median(rates[:, 0])), float(np.median(rates[:, 1])), float(np.median(rates[:, 1] / rates[:, 0]))


def prioritized_rates(capacities: tuple[int, ...] = (100_000, 1_000_000), batch: int = 256, n: int = 100,
                      blocks: int = 30, inserts: int = 32, host_frames: tuple[int, ...] = (100_000,)) -> dict[str, float]:
    """Per capacity: uniform and per batches/s of frame slots, their ratio (target >= 0.8), and
    bytes per slot of the priorities and of the ring; at the `host_frames` capacities the same for
    batches of frame stacks gathered on the host, the learner's default path (its frames are written
    first, 7 KB a slot: a gather from untouched zero pages would read one cached page). The two
    samplers alternate in `blocks` blocks of `n` batches (n / 5 with frames; 500 batches of slots
    take ~50 ms)."""
    out: dict[str, float] = {}
    for capacity in capacities:
        ring = synthetic_ring(capacity)
        name = f"{capacity // 1000}k" if capacity < 1_000_000 else f"{capacity // 1_000_000}m"
        per = PrioritizedSampler(alpha=0.6, beta0=0.4, beta_steps=100_000)
        # the first look fills the tree; it and a first update stay out of the timing
        warm = sample(ring, 1, np.random.default_rng(0), sampler=per, images=False)
        per.update_priorities(warm["indices"], np.ones(1))
        samplers = (UniformSampler(), per)
        uniform, prioritized, ratio = alternate(ring, samplers, blocks, batch=batch, n=n, inserts=inserts)
        ring_bytes = sum(getattr(ring, k).nbytes for k in (*FrameRing._FRAME_ARRAYS, *FrameRing._TRANSITION_ARRAYS))
        out |= {
            f"replay_uniform_batches_per_s_b{batch}_{name}_slots": uniform,
            f"replay_per_batches_per_s_b{batch}_{name}_slots": prioritized,
            f"replay_per_vs_uniform_ratio_{name}_slots": ratio,
            f"replay_per_bytes_per_slot_{name}_slots": per.nbytes() / capacity,
            f"replay_ring_bytes_per_slot_{name}_slots": ring_bytes / capacity,
        }
        if capacity in host_frames:
            ring.frames[:] = np.random.default_rng(2).integers(0, 256, ring.frames.shape[1:], np.uint8)
            uniform, prioritized, ratio = alternate(ring, samplers, blocks, batch=batch, n=max(1, n // 5),
                                                    inserts=inserts, images=True)
            out |= {
                f"replay_uniform_batches_per_s_b{batch}_{name}_slots_host_frames": uniform,
                f"replay_per_batches_per_s_b{batch}_{name}_slots_host_frames": prioritized,
                f"replay_per_vs_uniform_ratio_{name}_slots_host_frames": ratio,
            }
        del ring  # before the next capacity's ring is allocated: with host frames, 9 GB at 1M
    return out


SECTIONS = ["insert", "bytes", "sampling", "latency", "prioritized"]


def run(sections: list[str], host_frames: tuple[int, ...] = (100_000,)) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    if set(sections) & {"insert", "bytes", "sampling", "latency"}:
        real = env_chunks(2048)
        payloads = [(encode(c), c.steps) for c in real]
    if set(sections) & {"insert", "bytes", "latency"}:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), aof=True) as server:
            url = server.url
            if "insert" in sections:
                out["replay_insert_transitions_per_s_1_client"] = insert_rate(url, payloads, 1, repeat=8)
                out["replay_insert_transitions_per_s_4_clients"] = insert_rate(url, payloads, 4, repeat=4)
            if "bytes" in sections:
                bpt_real, frame_real = bytes_per_transition(url, real)
                bpt_noisy, frame_noisy = bytes_per_transition(url, env_chunks(512, noisy=True, seed=1))
                out |= {
                    "replay_bytes_per_transition_env_frames": bpt_real,
                    "replay_bytes_per_transition_target_env_frames": 1.25 * frame_real + 256,
                    "replay_mean_compressed_frame_env": frame_real,
                    "replay_bytes_per_transition_noisy_frames": bpt_noisy,
                    "replay_bytes_per_transition_target_noisy_frames": 1.25 * frame_noisy + 256,
                    "replay_mean_compressed_frame_noisy": frame_noisy,
                }
            if "latency" in sections:
                p50, p99 = latency(url, payloads)
                out |= {"replay_insert_to_sampleable_ms_p50": p50, "replay_insert_to_sampleable_ms_p99": p99}
    if "sampling" in sections:
        ours, baseline = sampling_ratio(real)
        out |= {
            "replay_sample_batches_per_s_b256": ours,
            "replay_numpy_gather_batches_per_s_b256": baseline,
            "replay_sample_vs_gather_ratio": ours / baseline,
        }
    if "prioritized" in sections:
        out |= prioritized_rates(host_frames=host_frames)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    parser.add_argument("--host-frames", default="100000",
                        help="prioritized: the capacities (of 100000, 1000000) also measured with frame stacks gathered on "
                             "the host, comma-separated; 1000000 writes ~9 GB of frames")
    args = parser.parse_args()
    names = chosen(parser, "--sections", args.sections, SECTIONS)
    try:
        host_frames = tuple(int(x) for x in args.host_frames.split(","))
    except ValueError:
        parser.error(f"--host-frames: comma-separated slot counts, got {args.host_frames!r}")
    write_report(section("replay", set(names) == set(SECTIONS), names), run(names, host_frames))


if __name__ == "__main__":
    main()
