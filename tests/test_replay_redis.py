import dataclasses
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from actors.adder import ChunkAdder
from common.chunk import HEADER, MAGIC, Chunk, ChunkError, decode, encode
from replay_server.client import ReplayClient, connect
from replay_server.ingest import RedisReplay
from replay_server.ring import FrameRing
from replay_server.server import RedisServer
from tests.conftest import ROOT
from tests.test_replay_ring import assert_same, record

KEY = "test:replay"


@pytest.fixture(scope="module")
def recorded():
    return record(150, max_episode_steps=40, seed=5)


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis") as s:
        yield s


def send(transitions, resets, sink, chunk_steps: int = 8, actor_id: int = 7) -> ChunkAdder:
    """Replays a recording through a ChunkAdder into `sink` (e.g. ReplayClient.insert)."""
    adder = ChunkAdder(actor_id=actor_id, chunk_steps=chunk_steps, sink=sink)
    resets = iter(resets)
    adder.reset(next(resets))
    for obs, action, reward, nxt, terminated, truncated in transitions:
        adder.add(action, float(reward), nxt, terminated, truncated, policy_version=3)
        if terminated or truncated:
            adder.reset(next(resets))
    adder.flush()
    return adder


def test_chunks_round_trip_through_redis_bit_for_bit(server, recorded):
    transitions, resets = recorded
    r = connect(server.url)
    client = ReplayClient(r, KEY, max_chunks=10_000)
    send(transitions, resets, client.insert)
    assert client.counters.transitions_inserted == len(transitions)
    ring = FrameRing(capacity=1000)
    replay = RedisReplay(r, KEY, ring, max_chunk_bytes=1 << 22)
    assert replay.warm_start() == len(transitions)
    # every frame once: one per step plus one per episode start, though chunks overlap
    episodes = sum(1 for t in transitions if t[4] or t[5]) + 1
    assert ring.frames_added == len(transitions) + episodes
    for i, expected in enumerate(transitions):
        assert_same({k: v[0] for k, v in ring.gather(np.array([i])).items()}, expected)
    # a learner restart reads it all again
    again = FrameRing(capacity=1000)
    assert RedisReplay(r, KEY, again, 1 << 22).warm_start() == len(transitions)
    # and poll() picks up only what is new
    assert replay.poll() == 0
    sent: list[Chunk] = []
    send(transitions[:5], resets, sent.append, actor_id=8)
    client.insert(sent[0])
    assert replay.poll() == 5
    # a chunk sent twice (an acknowledgement lost in a crash) enters the ring once
    client.insert(sent[0])
    assert replay.poll() == 0 and replay.counters.duplicates == 1


def test_fifo_capacity_in_redis(server, recorded):
    transitions, resets = recorded
    r = connect(server.url)
    client = ReplayClient(r, KEY, max_chunks=6)
    send(transitions, resets, client.insert)
    assert r.xlen(KEY) == 6
    ring = FrameRing(capacity=1000)
    RedisReplay(r, KEY, ring, 1 << 22).warm_start()
    # the survivors are the newest transitions, intact
    n = len(ring)
    for j, g in enumerate(range(ring.tail, ring.head)):
        assert_same({k: v[0] for k, v in ring.gather(np.array([g])).items()}, transitions[len(transitions) - n + j])


def test_data_survives_a_redis_crash_with_aof(tmp_path, recorded):
    transitions, resets = recorded
    s = RedisServer(tmp_path / "redis").start()
    client = ReplayClient(connect(s.url), KEY, max_chunks=10_000)
    send(transitions, resets, client.insert)
    time.sleep(1.5)  # appendfsync everysec
    s.kill()
    s2 = RedisServer(tmp_path / "redis", port=s.port).start()
    try:
        ring = FrameRing(capacity=1000)
        assert RedisReplay(connect(s2.url), KEY, ring, 1 << 22).warm_start() == len(transitions)
    finally:
        s2.stop()


def test_bad_entries_are_skipped_and_counted(server, recorded):
    transitions, resets = recorded
    r = connect(server.url)
    good: list[Chunk] = []
    send(transitions[:8], resets, good.append)
    payload = encode(good[0])
    r.xadd(KEY, {"c": b"garbage"})
    r.xadd(KEY, {"other": b"field"})
    r.xadd(KEY, {"c": payload[:-10]})  # truncated
    r.xadd(KEY, {"c": payload[:4] + struct.pack("<H", 99) + payload[6:]})  # future schema version
    r.xadd(KEY, {"c": pickle.dumps({"evil": object.__reduce__})})  # crafted for unpickling
    r.xadd(KEY, {"c": payload + b"\0" * 5000})  # oversized for this reader, and length mismatch
    r.xadd(KEY, {"c": payload})
    ring = FrameRing(capacity=100)
    replay = RedisReplay(r, KEY, ring, max_chunk_bytes=len(payload) + 100)
    assert replay.warm_start() == 8
    c = replay.counters
    assert (c.skipped_undecodable, c.skipped_foreign, c.skipped_oversized, c.chunks) == (4, 1, 1, 1)


def test_older_chunks_still_decode_and_a_vector_length_mismatch_is_named(recorded):
    """A replay stored before the vector length (version 1) or the optional sections (version 2)
    entered the header stays readable; a chunk from actors with other env.gap_features than the
    learner's is refused with the reason; the teacher section round-trips."""
    transitions, resets = recorded
    chunks: list[Chunk] = []
    send(transitions[:8], resets, chunks.append)
    chunk = chunks[0]
    v3 = encode(chunk)
    v2 = v3[:4] + struct.pack("<H", 2) + v3[6:HEADER.size + 2] + v3[HEADER.size + 3:]
    v1 = v3[:4] + struct.pack("<H", 1) + v3[6:HEADER.size] + v3[HEADER.size + 3:]
    for old in (v1, v2):
        decoded = decode(old, 53)
        assert np.array_equal(decoded.vectors, chunk.vectors) and decoded.teacher is None
    labelled = dataclasses.replace(chunk, teacher=np.full((chunk.steps, 2), 0.25, np.float32))
    assert np.array_equal(decode(encode(labelled)).teacher, labelled.teacher)
    unknown = bytearray(v3)
    unknown[HEADER.size + 2] = 2
    with pytest.raises(ChunkError, match="optional sections 0x2"):
        decode(bytes(unknown))
    wide = dataclasses.replace(chunk, vectors=np.ones((chunk.steps + 1, 55), np.float32))
    assert decode(encode(wide), 55).vectors.shape == (chunk.steps + 1, 55)
    with pytest.raises(ChunkError, match="55 features, this replay's 53.*env.gap_features"):
        decode(encode(wide), 53)


def test_decode_rejects_with_a_reason():
    with pytest.raises(ChunkError, match="shorter than its"):
        decode(b"AVT3")
    with pytest.raises(ChunkError, match="not an av-td3 chunk"):
        decode(b"X" * HEADER.size)
    header = HEADER.pack(MAGIC, 1, 0, 0, 0, 10_000, 10_004, 0, 0)
    with pytest.raises(ChunkError, match="inconsistent"):
        decode(header)
    header = HEADER.pack(MAGIC, 1, 0, 0, 0, 1, 2, 0, 8)  # claims an 8-byte lz4 block
    body = b"\x00" * 8 + b"\x00" * (2 * 53 * 4 + 8 + 4 + 1)
    with pytest.raises(ChunkError, match="do not decompress|decompress to"):
        decode(header + body)


def test_chunk_stack_rows():
    def rows(start, steps):
        n = steps + 1 + min(start, 3)
        return Chunk(0, 0, start, 0, np.zeros((n, 84, 84), np.uint8), np.zeros((steps + 1, 53), np.float32),
                     np.zeros((steps, 2), np.float32), np.zeros(steps, np.float32),
                     np.zeros(steps, bool), np.zeros(steps, bool)).stack_rows()
    assert rows(0, 2).tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 2]]
    assert rows(2, 1).tolist() == [[0, 0, 1, 2, 3]]  # frames f0..f3; transition 2 sees f_-1 = f0
    assert rows(32, 1).tolist() == [[0, 1, 2, 3, 4]]  # frames f29..f33


def test_password_protected_redis_refuses_a_client_without_it(tmp_path, recorded, monkeypatch):
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    with RedisServer(tmp_path / "redis", password="s3cret") as s:
        url_without = f"redis://127.0.0.1:{s.port}/0"
        client = ReplayClient(connect(url_without), KEY, max_chunks=100)
        transitions, resets = recorded
        with pytest.raises(RuntimeError, match="credentials"):
            send(transitions[:8], resets, client.insert)
        with pytest.raises(redis.exceptions.AuthenticationError):
            connect(url_without).xlen(KEY)
        monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
        ok = ReplayClient(connect(url_without), KEY, max_chunks=100)
        send(transitions[:8], resets, ok.insert)
        assert connect(s.url).xlen(KEY) == 1


def test_client_buffers_while_redis_is_down_and_flushes_when_it_returns(tmp_path, recorded):
    transitions, resets = recorded
    s = RedisServer(tmp_path / "redis", aof=False).start()
    client = ReplayClient(connect(s.url, timeout_s=0.5), KEY, max_chunks=10_000, buffer_chunks=5, backoff_s=(0.05, 0.2))
    s.kill()
    chunks: list[Chunk] = []
    send(transitions[:80], resets, chunks.append)
    send(transitions[:80], resets, client.insert)
    assert client.counters.send_failures >= 1
    assert client.counters.chunks_dropped == len(chunks) - 5 > 0 and len(client.pending) == 5
    s2 = RedisServer(tmp_path / "redis", port=s.port, aof=False).start()
    try:
        time.sleep(0.25)
        assert client.flush()
        assert client.counters.chunks_inserted == 5 and not client.pending
        assert connect(s2.url).xlen(KEY) == 5
    finally:
        s2.stop()


def _refuses(port: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
        except redis.exceptions.ConnectionError:
            return True
        time.sleep(0.1)
    return False


def _start(args: list[str], **popen: object) -> tuple["subprocess.Popen", int]:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True, **popen)
    line = proc.stdout.readline()
    port = int(line.strip().rsplit(":", 1)[-1].split("/")[0])
    redis.Redis(port=port).ping()
    return proc, port


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_serve_stops_redis_on_ctrl_c(tmp_path, inherited):
    # "ignored": started by a shell without job control in the background, which ignores SIGINT.
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" else None
    proc, port = _start(["-m", "replay_server", "serve", "--dir", str(tmp_path / "r")], preexec_fn=ignore)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert _refuses(port)


def test_redis_dies_with_a_killed_parent(tmp_path):
    code = ("import time; from replay_server.server import RedisServer; "
            f"s = RedisServer({str(tmp_path / 'r')!r}).start(); print(s.url, flush=True); time.sleep(60)")
    proc, port = _start(["-c", code])
    proc.kill()
    proc.wait()
    assert _refuses(port)


def test_server_accepts_a_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RedisServer(Path("runs/x/redis")) as s:
        assert connect(s.url).ping()
    assert (tmp_path / "runs/x/redis/redis.log").is_file()


def test_stats_and_inspect_cli(server, recorded, tmp_path, capsys):
    import json

    from replay_server.cli import main as cli

    transitions, resets = recorded
    send(transitions, resets, ReplayClient(connect(server.url), "avtd3:replay", max_chunks=1000).insert)
    assert cli(["stats", "--redis-url", server.url, "--window", "0.1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transitions"] == len(transitions) and report["newest_policy_version"] == 3
    assert 0 < report["bytes_per_transition"] < 7056  # frames compressed, stored once
    assert cli(["inspect", "--redis-url", server.url, "--n", "3", "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["sample_000.png", "sample_001.png", "sample_002.png"]
    assert cli(["stats", "--redis-url", "http://nope"]) == 2
