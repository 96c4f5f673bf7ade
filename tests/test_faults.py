"""Injected faults on a real local Ray cluster and real redis-servers: a SIGKILLed rollout actor, a
SIGKILLed redis-server, a SIGKILLed learner resumed with --resume latest, an unreachable Redis, and
an actor that can never start. For each fault: the run finishes (or stops with a clear error), every
transition Redis acknowledged before the fault is in the learner's ring afterwards, nothing enters
the ring twice or corrupted (the ring holds exactly the distinct chunks of the stream), and the
metrics show the restart. Each test prints its counts (run with -s to see them)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import ray
import redis as redis_lib

from common.chunk import decode
from common.config import load_config
from learner.cli import main
from learner.distributed import DistributedRun
from learner.run_dirs import latest_run
from replay_server.server import RedisServer, free_port
from tests.conftest import ROOT
from tests.test_distributed import FAST, scalars


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


def stream_transitions(client: redis_lib.Redis, key: str) -> tuple[Counter, int]:
    """The distinct transitions of the stream's chunks, as (action bytes, reward) counts, and the
    number of entries (resent chunks included)."""
    seen, found, entries = set(), Counter(), 0
    for _, fields in client.xrange(key):
        chunk = decode(fields[b"c"])
        entries += 1
        if (chunk.actor_id, chunk.episode_id, chunk.start_step) in seen:
            continue
        seen.add((chunk.actor_id, chunk.episode_id, chunk.start_step))
        found.update((a.tobytes(), float(r)) for a, r in zip(chunk.actions, chunk.rewards))
    return found, entries


def ring_transitions(ring) -> Counter:
    idx = np.arange(ring.tail, ring.head) % ring.capacity
    return Counter((ring.action[i].tobytes(), float(ring.reward[i])) for i in idx)


def _run_with_fault(tmp_path, at_step: int, inject, *overrides: str) -> tuple[DistributedRun, Counter]:
    """A 2-actor run of 800 steps; `inject(run)` is called once past `at_step`, right after the
    stream's acknowledged transitions are counted."""
    cfg = load_config(overrides=[*FAST, "actors.num_actors=2", "learner.max_timesteps=800", "eval.freq=0", *overrides])
    run = DistributedRun(cfg, tmp_path / "run").init()
    ray.get([h.pid.remote() for h in run.actors.handles.values()])
    collect, before = run._collect_reports, Counter()

    def collect_then_fault() -> int:
        new_steps = collect()
        if not before and run.core.env_step >= at_step:
            before.update(stream_transitions(run.core.replay.redis, cfg.replay.stream_key)[0])
            inject(run)
        return new_steps

    run._collect_reports = collect_then_fault
    run.run()
    assert before and run.core.env_step >= 800
    return run, before


def persisted_transitions(run_dir, key: str = "avtd3:replay") -> tuple[Counter, int]:
    """`stream_transitions` of a finished (or killed) run's Redis, read back from its AOF."""
    with RedisServer(run_dir / "redis") as server:
        return stream_transitions(redis_lib.Redis.from_url(server.url), key)


def _check_nothing_lost_or_doubled(run: DistributedRun, before: Counter, name: str) -> None:
    after, entries = persisted_transitions(run.run_dir, run.cfg.replay.stream_key)
    ring = ring_transitions(run.core.ring)
    counters = run.core.replay.ingest.counters
    print(f"\nFAULT {name}: acknowledged before {sum(before.values())}, in the ring after {sum(ring.values())} "
          f"(stream: {sum(after.values())} distinct transitions in {entries} entries; resent chunks dropped "
          f"by the ring: {counters.duplicates}; entries skipped: {counters.skipped_undecodable + counters.skipped_foreign})")
    assert not before - ring, "every acknowledged transition is sampleable after the fault"
    assert ring == after, "the ring holds exactly the distinct transitions of the stream: none doubled or corrupt"
    assert counters.skipped_undecodable == counters.skipped_foreign == counters.skipped_oversized == 0


def test_sigkill_of_a_rollout_actor_mid_episode(tmp_path):
    def kill_actor_1(run):
        os.kill(ray.get(run.actors.handles[1].pid.remote()), signal.SIGKILL)

    run, before = _run_with_fault(tmp_path, 200, kill_actor_1)
    _check_nothing_lost_or_doubled(run, before, "actor SIGKILL")
    assert run.actors.restarts >= 1
    _, restarts = scalars(tmp_path / "run", "actors/restarts")
    assert restarts[-1][1] >= 1


def test_sigkill_of_redis_restarts_it_from_its_aof(tmp_path):
    def kill_redis(run):
        run.core.replay.server.kill()

    # appendfsync always: an acknowledged insert is on disk, so a SIGKILL cannot lose it.
    run, before = _run_with_fault(tmp_path, 200, kill_redis, "replay.aof_fsync=always")
    _check_nothing_lost_or_doubled(run, before, "redis-server SIGKILL")
    assert run.core.replay.redis_restarts >= 1
    _, restarts = scalars(tmp_path / "run", "replay/redis_restarts")
    assert restarts[-1][1] >= 1


def test_sigkill_of_the_learner_then_resume_latest(tmp_path):
    sets = [arg for o in FAST if o != "eval.freq=200" for arg in ("--set", o)]
    sets += ["--set", "eval.freq=0", "--set", "replay.aof_fsync=always", "--set", "learner.checkpoint_freq=150"]
    cmd = [sys.executable, "-m", "learner", "--num-actors", "2", "--logdir", str(tmp_path), *sets]
    proc = subprocess.Popen([*cmd, "--max-timesteps", "100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            written = re.search(r"checkpoint: .*step_(\d+)", line)
            if written and int(written.group(1)) >= 300:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        time.sleep(2)
        # Ray's dashboard and runtime-env agents outlive a SIGKILLed driver (see docs/reliability.md); the test
        # cleans up the learner's session so nothing leaks into later tests.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run_dir = latest_run(tmp_path)
    killed_at = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    # What Redis acknowledged before the kill is in its AOF: count it with a redis-server of our own.
    before, _ = persisted_transitions(run_dir)
    resumed = subprocess.run([*cmd, "--resume", "latest", "--max-timesteps", str(killed_at + 200)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    restored = int(re.search(r"replay service: (\d+) transitions already in", out).group(1))
    print(f"\nFAULT learner SIGKILL: acknowledged before {sum(before.values())}, read back into the ring at resume "
          f"{restored}; killed after checkpoint step {killed_at}")
    assert restored == sum(before.values()), "every acknowledged transition, once"
    _, resumes = scalars(run_dir, "alerts/learner_resumes")
    assert resumes == [(killed_at, 1.0)]


def test_unreachable_redis_is_retried_then_a_clear_error(tmp_path, capsys):
    port = free_port()
    start = time.monotonic()
    rc = main(["--mode", "serial", "--logdir", str(tmp_path), "--redis-url", f"redis://:s3cret@127.0.0.1:{port}/0",
               "--set", "replay.via_redis=true", "--set", "replay.connect_timeout_s=2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"no Redis answered at 127.0.0.1:{port}/0 within 2 s" in err and "s3cret" not in err
    assert time.monotonic() - start >= 1.5, "it retried before giving up"


def test_an_actor_that_can_never_start_stops_the_run(tmp_path, capsys):
    sets = [arg for o in FAST for arg in ("--set", o)]
    rc = main(["--logdir", str(tmp_path), "--num-actors", "1", *sets, "--set", "eval.freq=0",
               "--set", "env.backend=carla", "--set", "carla.server_command=/nonexistent/CarlaUE4.sh",
               "--set", "actors.max_consecutive_deaths=2", "--set", "actors.restart_backoff_s=0.1",
               # Each also reserves a CPU for its server: the actor and the evaluator fit 2 cores.
               "--set", "actors.num_cpus=0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "rollout actor 0 died 2 times in a row" in err and "/nonexistent/CarlaUE4.sh" in err
