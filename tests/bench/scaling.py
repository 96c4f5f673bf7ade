"""`make bench-scaling`: rollout actors on a local Ray cluster against the raw env.

- raw env steps/s (random actions, one process, no replay), measured again before every timed
  round of a single actor, each round's ratio against the raw rate just before it (medians);
- one actor's loop with random actions (env + chunking + Redis inserts) and with the CNN policy
  (env + CPU inference + inserts), as fractions of the raw rate;
- one policy-driven actor stepping K = 1, 2, 4, 8, 16, 32, 64 envs with one batched forward per step: its
  total env steps/s against the raw rate (K raw envs stepped in a plain loop on one core run at
  the raw rate); the target is >= 0.8; each K with a float32 and a bfloat16 policy
  (`actors.inference_dtype`); with each, the policy forward's ms per env step (from the actor's
  own `inference_seconds`) and the ceiling it sets: raw step / (raw step + forward), the ratio a
  loop that cost nothing besides the env and the forward would reach;
- aggregate env steps/s of 1 and 2 policy-driven actors, and their ratio;
- where torch sees a GPU: the K-env actor again with its policy on the GPU (`actors.device=cuda`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.rollout import RolloutWorker
from common.config import load_config
from common.networks import policy_for
from common.weights import WeightStore, policy_to_bytes
from replay_server.server import RedisServer
from tests.bench.foundation import env_rate
from tests.bench.report import chosen, section, write_report

STEPS = 800
ROUNDS = 5
RAW_STEPS = 800
ENVS_PER_ACTOR = (1, 2, 4, 8, 16, 32, 64)


def actors_rate(url: str, store: object, num_actors: int, policy: bool, envs: int = 1, device: str = "cpu",
                dtype: str = "float32", raws: list[float] | None = None) -> tuple[float, float, float, float]:
    """(env steps/s of `num_actors` actors, the same / the raw env rate, ms of policy forward per
    env step, the ceiling: the ratio a loop costing only the raw env step plus that forward would
    reach): medians over rounds.

    The host's speed drifts here by up to 1.6x within two minutes, so with `raws` each timed
    round follows a raw env measurement of its own (appended to `raws`; the actors idle
    meanwhile) and the ratio is the median of the per-round ratios."""
    gpus = 0.5 if device == "cuda" else 0.0
    overrides = [f"td3.learning_starts={0 if policy else 10**9}", "env.scenario=0", f"actors.envs_per_actor={envs}",
                 f"actors.device={device}", f"actors.num_gpus={gpus}", f"actors.inference_dtype={dtype}",
                 "actors.noise_scale_min=1.0", "actors.noise_scale_max=1.0"]
    cfg = dataclasses.asdict(load_config(overrides=overrides))
    worker = ray.remote(RolloutWorker).options(num_cpus=1, num_gpus=gpus)
    actors = [worker.remote(cfg, i, 0, url, store) for i in range(num_actors)]
    warmup = ray.get([a.run.remote(50, 10**6) for a in actors])  # imports, first weights
    inference_before = sum(r["inference_seconds"] for r in warmup)
    rates, ratios, forward_ms, ceilings = [], [], [], []
    for _ in range(ROUNDS):
        raw = env_rate(0, RAW_STEPS) if raws is not None else float("nan")
        start = time.perf_counter()
        reports = ray.get([a.run.remote(STEPS, 10**6) for a in actors])
        steps = sum(r["steps"] for r in reports)
        rates.append(steps / (time.perf_counter() - start))
        ratios.append(rates[-1] / raw)
        # inference_seconds is cumulative per actor: this round's share is the increase.
        seconds = sum(r["inference_seconds"] for r in reports)
        forward_ms.append(1e3 * (seconds - inference_before) / steps)
        inference_before = seconds
        ceilings.append((1e3 / raw) / (1e3 / raw + forward_ms[-1]))
        if raws is not None:
            raws.append(raw)
    for a in actors:
        ray.kill(a)
    return tuple(float(np.median(x)) for x in (rates, ratios, forward_ms, ceilings))


RUNS = {"policy": {}, "bf16_policy": {"dtype": "bfloat16"}, "cuda_policy": {"device": "cuda"}}
"""The K-env rows: a float32 and a bfloat16 policy on the CPU, and a float32 policy on the GPU."""


def run(runs: list[str], envs: list[int], whole: bool) -> dict[str, float | str]:
    """The K-env rows of `runs` at each K in `envs`; `whole` adds the random-action loop and the
    two-actor rows (they need the float32 row at K = 1)."""
    raws: list[float] = []
    ray.init(num_cpus=2, num_gpus=int(torch.cuda.is_available()), include_dashboard=False,
             object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), aof=False) as server:
            store = ray.remote(WeightStore).options(num_cpus=0).remote()
            store.publish.remote(0, [ray.put(policy_to_bytes(policy_for(load_config())))])
            if whole:
                random_loop = actors_rate(server.url, store, 1, policy=False, raws=raws)
            per_k = {(name, k): actors_rate(server.url, store, 1, policy=True, envs=k, raws=raws, **RUNS[name])
                     for name in runs for k in envs}
            if whole:
                one = per_k[("policy", 1)][0]
                two = actors_rate(server.url, store, 2, policy=True)[0]
    finally:
        ray.shutdown()
    figures: dict[str, float | str] = {
        "raw_env_steps_per_s": float(np.median(raws)),
        "raw_env_steps_per_s_range": f"{min(raws):.0f}-{max(raws):.0f} over {len(raws)} measurements",
    }
    if whole:
        figures.update({
            "actor_loop_random_actions_steps_per_s": random_loop[0],
            "actor_loop_random_vs_raw": random_loop[1],
            "actor_loop_policy_steps_per_s": one,
            "actor_loop_policy_vs_raw": per_k[("policy", 1)][1],
            "two_actors_policy_steps_per_s": two,
            "two_vs_one_actor_ratio": two / one,
        })
    for i, what in enumerate(("steps_per_s", "vs_raw", "forward_ms_per_step", "ceiling_vs_raw")):
        figures.update({f"actor_loop_{name}_{k}_envs_{what}": row[i] for (name, k), row in per_k.items()})
    return figures


def main() -> None:
    """`--runs cuda_policy --envs 1,8` times only those rows (a device check's time is short),
    into its own report section, so the full CPU table stays."""
    parser = argparse.ArgumentParser(description=__doc__)
    available = [name for name in RUNS if name != "cuda_policy" or torch.cuda.is_available()]
    parser.add_argument("--runs", default=",".join(available), help=f"comma-separated, from {available}")
    parser.add_argument("--envs", default=",".join(map(str, ENVS_PER_ACTOR)), help="comma-separated K values")
    args = parser.parse_args()
    runs = chosen(parser, "--runs", args.runs, available)
    try:
        envs = [int(k) for k in args.envs.split(",")]
    except ValueError:
        parser.error(f"--envs {args.envs}: expected comma-separated integers")
    if min(envs) < 1:
        parser.error(f"--envs {args.envs}: every K must be >= 1")
    whole = runs == available and envs == list(ENVS_PER_ACTOR)
    write_report(section("scaling", whole, runs), run(runs, envs, whole))


if __name__ == "__main__":
    main()
