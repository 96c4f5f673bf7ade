"""Learner speed and memory, each comparison measured in one run on one device:

- our TD3 update at batch 256 on one in-memory batch vs. on batches sampled from our replay ring
  (the data path: sampling frame stacks, host -> device copy);
- Stable-Baselines3's TD3 with the identical NatureCNN and MLPs (its own Dict replay buffer, same
  batch, same device, same policy delay and target noise) vs. ours, updates/s, timed in
  alternating blocks (five on the CPU), the ratio being the median of the per-block ratios;
- the learner's resident memory per stored transition (a ring of 50k noisy frames), next to what
  SB3's DictReplayBuffer allocates per transition;
- how close to the hardware: the FLOPs of one update (counted by torch's FlopCounterMode, the
  actor update's share included) times our updates/s, against a large matmul timed on the same
  device in the same run;
- sampling with the frames copied to the device (`learner.replay_on_device`) vs. from the host;
- on CUDA: fp32 vs bf16 autocast vs channels_last (and both), the fused Adam always on; which won;
  the peak GPU memory of our update and of SB3's.

`make bench-learner` (part of `make bench`); needs the `bench` extra (stable-baselines3).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import psutil
import torch

from common.batch import Batch
from common.chunk import Chunk
from common.config import Config, load_config
from common.driving import ACTION_DIM, FRAME_SIZE, VECTOR_DIM
from common.env import observation_space
from learner.device_frames import DeviceFrames
from learner.td3 import TD3
from replay_server.ring import FrameRing
from replay_server.sampler import sample
from tests.bench.report import chosen, section, write_report
from tests.conftest import random_batch_arrays

BATCH = 256
ROUNDS = 5  # CPU: alternating timed blocks of ours and SB3 for the ratio
CHUNK = 32


def fill_ring(ring: FrameRing, transitions: int, seed: int = 0) -> None:
    """Noisy camera-like frames (incompressible, like the worst case of a real camera)."""
    rng = np.random.default_rng(seed)
    episode, added = 0, 0
    while added < transitions:
        for start in range(0, 256, CHUNK):  # 256-step episodes cut into 32-step chunks
            frames = rng.integers(0, 256, (CHUNK + 1 + min(start, 3), FRAME_SIZE, FRAME_SIZE), np.uint8)
            ring.add_chunk(Chunk(0, episode, start, 0, frames, rng.normal(size=(CHUNK + 1, VECTOR_DIM)).astype(np.float32),
                                 rng.uniform(-1, 1, (CHUNK, ACTION_DIM)).astype(np.float32),
                                 rng.normal(size=CHUNK).astype(np.float32), np.zeros(CHUNK, bool), np.zeros(CHUNK, bool)))
            added += CHUNK
        episode += 1


def _timed(step, n: int, device: torch.device) -> float:
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bench_config(device: torch.device, *overrides: str) -> Config:
    # No critic warm-up: a few timed updates would otherwise all be critic-only.
    return load_config(overrides=[f"td3.batch_size={BATCH}", f"learner.device={device.type}", "td3.critic_warmup_updates=0",
                                  *overrides])


def our_update(device: torch.device, ring: FrameRing | None, *overrides: str) -> Callable[[], object]:
    """One update of our TD3; from `ring` (sampled each update) or one fixed in-memory batch."""
    cfg = bench_config(device, *overrides)
    agent = TD3(cfg, device)
    if ring is None:
        batch = Batch.from_numpy(random_batch_arrays(BATCH), device)
        return lambda: agent.update(batch)
    rng = np.random.default_rng(0)
    if cfg.learner.replay_on_device:
        frames = DeviceFrames(ring, device)
        return lambda: agent.update(frames.batch(sample(ring, BATCH, rng, images=False)))
    return lambda: agent.update(Batch.from_numpy(sample(ring, BATCH, rng), device))


def timed_updates(device: torch.device) -> int:
    """Updates per timed block: a CPU update takes ~0.25 s, a GPU one a few ms."""
    return 8 if device.type == "cpu" else 200


def ours(device: torch.device, ring: FrameRing | None, n: int, *overrides: str) -> float:
    """Updates/s of our TD3 (see `our_update`)."""
    return _timed(our_update(device, ring, *overrides), n, device)


def side_by_side(a: Callable[[], object], b: Callable[[], object], n: int, rounds: int,
                 device: torch.device) -> tuple[float, float, float]:
    """(median updates/s of a, of b, median of the per-round ratios a / b), timing n updates of
    each in turn: this host's speed drifts by up to 1.6x within minutes, which one block each
    minutes apart would read as a difference between a and b."""
    rates = [(_timed(a, n, device), _timed(b, n, device)) for _ in range(rounds)]
    return (float(np.median([x for x, _ in rates])), float(np.median([y for _, y in rates])),
            float(np.median([x / y for x, y in rates])))


def flops_per_update(device: torch.device) -> float:
    """Mean FLOPs of one update over a `policy_delay` cycle (critic every update, actor and
    targets once per cycle), as torch's FlopCounterMode counts them (matmuls and convolutions,
    forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = bench_config(device)
    agent = TD3(cfg, device)
    batch = Batch.from_numpy(random_batch_arrays(BATCH), device)
    agent.update(batch)  # the first update allocates the optimizers' state
    cycle = cfg.td3.policy_delay
    while agent.updates % cycle:
        agent.update(batch)
    with FlopCounterMode(display=False) as counter:
        for _ in range(cycle):
            agent.update(batch)
    return counter.get_total_flops() / cycle


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on `device`: what this device does on the friendliest workload."""
    size = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    rate = _timed(lambda: a @ b, 50 if device.type == "cuda" else 10, device)
    return 2 * size**3 * rate


def peak_gpu_mb(run: Callable[[], object], device: torch.device) -> float:
    """Peak GPU memory allocated while `run` runs, MB."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return torch.cuda.max_memory_allocated(device) / 2**20


def sb3_update(device: torch.device) -> tuple[Callable[[], object], float]:
    """(one update, replay bytes per transition) of SB3's TD3 with our CNN and MLP sizes."""
    from stable_baselines3 import TD3 as SB3TD3
    from stable_baselines3.common.logger import configure

    from tests.bench.peer import features_extractor_class

    class SpacesOnly(gym.Env):
        observation_space = observation_space()
        action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    size = 5000
    model = SB3TD3(
        "MultiInputPolicy", SpacesOnly(), buffer_size=size, batch_size=BATCH, learning_starts=0, device=device,
        policy_kwargs={"features_extractor_class": features_extractor_class(), "net_arch": [256, 256], "normalize_images": False,
                       "share_features_extractor": False},
    )
    model.set_logger(configure(None, []))
    rng = np.random.default_rng(0)
    for _ in range(2000):
        obs = {"image": rng.integers(0, 256, (1, 4, 84, 84), np.uint8), "vector": rng.normal(size=(1, VECTOR_DIM)).astype(np.float32)}
        model.replay_buffer.add(obs, obs, rng.uniform(-1, 1, (1, ACTION_DIM)), rng.normal(size=1), np.zeros(1), [{}])
    buf = model.replay_buffer
    arrays = [*buf.observations.values(), *buf.next_observations.values(), buf.actions, buf.rewards, buf.dones, buf.timeouts]
    per_transition = sum(a.nbytes for a in arrays) / size
    return (lambda: model.train(gradient_steps=1, batch_size=BATCH)), per_transition


def sb3(device: torch.device, n: int) -> float:
    """Updates/s of SB3's TD3 (see `sb3_update`)."""
    return _timed(sb3_update(device)[0], n, device)


def rss_per_transition(transitions: int = 50_000) -> tuple[float, float]:
    """(bytes of learner RSS per stored transition, array bytes per transition) of a full ring."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    ring = FrameRing(transitions)
    fill_ring(ring, transitions)
    grown = proc.memory_info().rss - before
    arrays = sum(a.nbytes for a in (ring.frames, ring.frame_ids, ring.vector, ring.next_vector, ring.action, ring.reward, ring.done))
    return grown / len(ring), arrays / ring.capacity


def run(devices: list[torch.device]) -> dict[str, float | str]:
    results: dict[str, float | str] = {}
    ring = FrameRing(20_000)
    fill_ring(ring, 20_000)
    for device in devices:
        n = timed_updates(device)
        d = device.type
        synthetic = ours(device, None, n)
        theirs_update, sb3_bytes = sb3_update(device)
        replay, theirs, ratio = side_by_side(our_update(device, ring), theirs_update, n, ROUNDS if d == "cpu" else 1, device)
        results[f"{d}: our updates/s, b256, in-memory batch"] = synthetic
        results[f"{d}: our updates/s, b256, sampled from our replay"] = replay
        results[f"{d}: data path cost (replay / in-memory)"] = replay / synthetic
        results[f"{d}: our updates/s, b256, frames copied to the device (learner.replay_on_device)"] = ours(
            device, ring, n, "learner.replay_on_device=true")
        results[f"{d}: SB3 TD3 updates/s, b256, same CNN and MLPs"] = theirs
        results[f"{d}: ours (from replay) / SB3, median of per-round ratios"] = ratio
        flops, peak = flops_per_update(device), matmul_flops_per_s(device)
        results[f"{d}: GFLOP per update (counted)"] = flops / 1e9
        results[f"{d}: achieved TFLOP/s (ours from replay)"] = flops * replay / 1e12
        results[f"{d}: fp32 matmul TFLOP/s, same device"] = peak / 1e12
        results[f"{d}: achieved / matmul"] = flops * replay / peak
        results["SB3 DictReplayBuffer bytes per transition"] = sb3_bytes
        if device.type == "cuda":
            variants = {
                "fp32": ["learner.amp=false", "learner.channels_last=false"],
                "bf16 autocast": ["learner.amp=true", "learner.channels_last=false"],
                "channels_last": ["learner.amp=false", "learner.channels_last=true"],
                "bf16 + channels_last": ["learner.amp=true", "learner.channels_last=true"],
            }
            speeds = {name: ours(device, ring, n, *o) for name, o in variants.items()}
            results.update({f"cuda: {name} updates/s (from replay)": v for name, v in speeds.items()})
            results["cuda: fastest variant"] = max(speeds, key=speeds.get)
            results["cuda: bf16 matmul TFLOP/s"] = matmul_flops_per_s(device, torch.bfloat16) / 1e12
            results["cuda: peak GPU MB, our update (from replay)"] = peak_gpu_mb(lambda r=ring: ours(device, r, 5), device)
            results["cuda: peak GPU MB, SB3 update"] = peak_gpu_mb(lambda: sb3(device, 5), device)
    del ring
    rss, arrays = rss_per_transition()
    results["learner RSS bytes per stored transition (noisy frames)"] = rss
    results["learner ring array bytes per transition"] = arrays
    return results


def main() -> None:
    """`--devices cuda` skips the CPU rows (a device check's time is short); the report's section is
    `learner` with every device and `learner_<devices>` otherwise, so the CPU table stays."""
    parser = argparse.ArgumentParser(description=__doc__)
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", default=",".join(available), help=f"comma-separated, from {available}")
    names = chosen(parser, "--devices", parser.parse_args().devices, available)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    write_report(section("learner", names == available, names), run([torch.device(n) for n in names]))


if __name__ == "__main__":
    main()
