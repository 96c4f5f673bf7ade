"""Learner speed and memory, each comparison measured in one run on one device:

- side by side, timed in alternating blocks (five on the CPU), each ratio the median of the
  per-block ratios: our TD3 update plain (`learner.compile=none`), ours compiled (`default` on
  the CPU, `reduce-overhead`, i.e. with CUDA graphs, on a GPU) and Stable-Baselines3's TD3 with
  the identical NatureCNN and MLPs (its own Dict replay buffer, same batch, same device, same
  policy delay and target noise), updates/s at batch 256 (and 1024 on a GPU), ours sampled from
  our replay ring; each one's achieved TFLOP/s and, on a GPU, its peak memory;
- our update on one in-memory batch vs. on batches sampled from our replay ring (the data path:
  sampling frame stacks, host -> device copy);
- the learner's resident memory per stored transition (a ring of 50k noisy frames), next to what
  SB3's DictReplayBuffer allocates per transition;
- how close to the hardware: the FLOPs of one update (counted by torch's FlopCounterMode, the
  actor update's share included) times our updates/s, against a large matmul timed on the same
  device in the same run;
- sampling with the frames copied to the device (`learner.replay_on_device`) vs. from the host;
- on CUDA: fp32 vs bf16 autocast vs channels_last (and both), the fused Adam always on; which won;
  the peak GPU memory of our update and of SB3's.

`make bench-learner` (part of `make bench`); needs the `bench` extra (stable-baselines3).
`ARGS=--quick`: one short block of each, small rings, to check the bench end to end (its
figures go to a section of their own, `learner_quick`, and are no measurement).
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
from learner.compiled import failures
from learner.device_frames import DeviceFrames
from learner.td3 import TD3
from replay_server.ring import FrameRing
from replay_server.sampler import sample
from tests.bench.report import chosen, section, write_report
from tests.conftest import random_batch_arrays

BATCH = 256
GPU_BATCHES = (256, 1024)
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


def bench_config(device: torch.device, *overrides: str, batch: int = BATCH) -> Config:
    # No critic warm-up: a few timed updates would otherwise all be critic-only.
    return load_config(overrides=[f"td3.batch_size={batch}", f"learner.device={device.type}", "td3.critic_warmup_updates=0",
                                  *overrides])


def our_agent_update(device: torch.device, ring: FrameRing | None, *overrides: str,
                     batch: int = BATCH) -> tuple[TD3, Callable[[], object]]:
    """(the agent, one update of it) from `ring` (sampled each update) or one fixed in-memory batch."""
    cfg = bench_config(device, *overrides, batch=batch)
    agent = TD3(cfg, device)
    if ring is None:
        fixed = Batch.from_numpy(random_batch_arrays(batch), device)
        return agent, lambda: agent.update(fixed)
    rng = np.random.default_rng(0)
    if cfg.learner.replay_on_device:
        frames = DeviceFrames(ring, device)
        return agent, lambda: agent.update(frames.batch(sample(ring, batch, rng, images=False)))
    return agent, lambda: agent.update(Batch.from_numpy(sample(ring, batch, rng), device))


def our_update(device: torch.device, ring: FrameRing | None, *overrides: str, batch: int = BATCH) -> Callable[[], object]:
    """One update of our TD3 (see `our_agent_update`)."""
    return our_agent_update(device, ring, *overrides, batch=batch)[1]


def timed_updates(device: torch.device) -> int:
    """Updates per timed block: a CPU update takes ~0.25 s, a GPU one a few ms."""
    return 8 if device.type == "cpu" else 200


def ours(device: torch.device, ring: FrameRing | None, n: int, *overrides: str) -> float:
    """Updates/s of our TD3 (see `our_update`)."""
    return _timed(our_update(device, ring, *overrides), n, device)


def side_by_side(steps: dict[str, Callable[[], object]], n: int, rounds: int,
                 device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """(median updates/s of each, median per-round ratio of each to the last), timing n updates
    of each in turn: this host's speed drifts by up to 1.6x within minutes, which one block each
    minutes apart would read as a difference between them."""
    rates = [{name: _timed(step, n, device) for name, step in steps.items()} for _ in range(rounds)]
    last = list(steps)[-1]
    return ({name: float(np.median([r[name] for r in rates])) for name in steps},
            {name: float(np.median([r[name] / r[last] for r in rates])) for name in steps})


def compiled_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def plain_compiled_sb3(device: torch.device, ring: FrameRing, batch: int, n: int, rounds: int,
                       peak: float) -> dict[str, float | str]:
    """Ours plain, ours compiled and SB3 side by side at `batch`: updates/s, ratios, TFLOP/s
    (the update's counted FLOPs times its rate, against the matmul's `peak` FLOP/s) and on a GPU
    peak memory."""
    d, mode = device.type, compiled_mode(device)
    plain = our_update(device, ring, "learner.compile=none", batch=batch)
    agent, compiled = our_agent_update(device, ring, f"learner.compile={mode}", batch=batch)
    start = time.perf_counter()
    for _ in range(3):  # compiles: the critic-only update, the one with the actor, the guard's copy
        compiled()
    compile_s = time.perf_counter() - start
    names = {"plain": "ours plain", "compiled": f"ours compiled ({mode})", "sb3": "SB3 TD3, same CNN and MLPs"}
    rates, ratios = side_by_side({"plain": plain, "compiled": compiled, "sb3": sb3_update(device, batch)[0]},
                                 n, rounds, device)
    out: dict[str, float | str] = {f"{d}: b{batch} updates/s, {names[k]}": v for k, v in rates.items()}
    out[f"{d}: b{batch} ours plain / SB3"] = ratios["plain"]
    out[f"{d}: b{batch} ours compiled / SB3"] = ratios["compiled"]
    out[f"{d}: b{batch} compiled / plain"] = ratios["compiled"] / ratios["plain"]
    out[f"{d}: b{batch} compilation, first 3 updates (s)"] = compile_s
    if fell_back := failures(agent):
        out[f"{d}: b{batch} compilation fell back to eager"] = "; ".join(f"{k}: {v}" for k, v in fell_back.items())
    flops = flops_per_update(device, batch)
    out[f"{d}: b{batch} GFLOP per update (counted)"] = flops / 1e9
    for k in ("plain", "compiled"):
        out[f"{d}: b{batch} achieved TFLOP/s, {names[k]}"] = flops * rates[k] / 1e12
        out[f"{d}: b{batch} achieved / matmul, {names[k]}"] = flops * rates[k] / peak
    if device.type == "cuda":
        for k, step in {"plain": plain, "compiled": compiled}.items():
            out[f"cuda: b{batch} peak GPU MB, {names[k]}"] = peak_gpu_mb(lambda s=step: [s() for _ in range(5)], device)
        out[f"cuda: b{batch} peak GPU MB, {names['sb3']}"] = peak_gpu_mb(lambda: sb3(device, 5, batch), device)
    return out


def flops_per_update(device: torch.device, batch: int = BATCH) -> float:
    """Mean FLOPs of one update over a `policy_delay` cycle (critic every update, actor and
    targets once per cycle), as torch's FlopCounterMode counts them (matmuls and convolutions,
    forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = bench_config(device, batch=batch)
    agent = TD3(cfg, device)
    fixed = Batch.from_numpy(random_batch_arrays(batch), device)
    agent.update(fixed)
    cycle = cfg.td3.policy_delay
    while agent.updates % cycle:
        agent.update(fixed)
    with FlopCounterMode(display=False) as counter:
        for _ in range(cycle):
            agent.update(fixed)
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


def sb3_update(device: torch.device, batch: int = BATCH) -> tuple[Callable[[], object], float]:
    """(one update, replay bytes per transition) of SB3's TD3 with our CNN and MLP sizes."""
    from stable_baselines3 import TD3 as SB3TD3
    from stable_baselines3.common.logger import configure

    from tests.bench.peer import features_extractor_class

    class SpacesOnly(gym.Env):
        observation_space = observation_space(load_config().env)
        action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    size = 5000
    model = SB3TD3(
        "MultiInputPolicy", SpacesOnly(), buffer_size=size, batch_size=batch, learning_starts=0, device=device,
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
    return (lambda: model.train(gradient_steps=1, batch_size=batch)), per_transition


def sb3(device: torch.device, n: int, batch: int = BATCH) -> float:
    """Updates/s of SB3's TD3 (see `sb3_update`)."""
    return _timed(sb3_update(device, batch)[0], n, device)


def rss_per_transition(transitions: int = 50_000) -> tuple[float, float]:
    """(bytes of learner RSS per stored transition, array bytes per transition) of a full ring."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    ring = FrameRing(transitions)
    fill_ring(ring, transitions)
    grown = proc.memory_info().rss - before
    arrays = sum(a.nbytes for a in (ring.frames, ring.frame_ids, ring.vector, ring.next_vector, ring.action, ring.reward, ring.done))
    return grown / len(ring), arrays / ring.capacity


def run(devices: list[torch.device], quick: bool = False) -> dict[str, float | str]:
    results: dict[str, float | str] = {}
    size = 2_000 if quick else 20_000
    ring = FrameRing(size)
    fill_ring(ring, size)
    for device in devices:
        n = 2 if quick else timed_updates(device)
        d = device.type
        rounds = ROUNDS if d == "cpu" and not quick else 1
        peak = matmul_flops_per_s(device)
        results[f"{d}: fp32 matmul TFLOP/s, same device"] = peak / 1e12
        for batch in (GPU_BATCHES if d == "cuda" else (BATCH,)):
            results.update(plain_compiled_sb3(device, ring, batch, n, 1 if batch != BATCH else rounds, peak))
        synthetic = ours(device, None, n)
        replay = results[f"{d}: b{BATCH} updates/s, ours plain"]
        results[f"{d}: our updates/s, b256, in-memory batch"] = synthetic
        results[f"{d}: data path cost (replay / in-memory)"] = replay / synthetic
        results[f"{d}: our updates/s, b256, frames copied to the device (learner.replay_on_device)"] = ours(
            device, ring, n, "learner.replay_on_device=true")
        results["SB3 DictReplayBuffer bytes per transition"] = sb3_update(device)[1]
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
    del ring
    rss, arrays = rss_per_transition(5_000 if quick else 50_000)
    results["learner RSS bytes per stored transition (noisy frames)"] = rss
    results["learner ring array bytes per transition"] = arrays
    return results


def main() -> None:
    """`--devices cuda` skips the CPU rows (a device check's time is short); the report's section is
    `learner` with every device and `learner_<devices>` otherwise, so the CPU table stays."""
    parser = argparse.ArgumentParser(description=__doc__)
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", default=",".join(available), help=f"comma-separated, from {available}")
    parser.add_argument("--quick", action="store_true", help="one short block of each: an end-to-end check, no figures")
    args = parser.parse_args()
    names = chosen(parser, "--devices", args.devices, available)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    name = section("learner", names == available, names) + ("_quick" if args.quick else "")
    write_report(name, run([torch.device(n) for n in names], args.quick))


if __name__ == "__main__":
    main()
