"""The reference policies on the scenario ladder: results/scenarios.{md,json}.

`python -m tests.bench.scenarios [--scenarios 0,1,2] [--blocks 3] [--episodes 20] [--set a.b=c ...] [--name N]`:
for each scenario and
evaluation seed k, the privileged baseline, the traffic-blind PID + pure pursuit and the uniformly random
policy on the held-out episodes HELD_OUT_SEED + k * episodes ... (+ episodes - 1), one process per scenario.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

from tests.bench.experiments import HELD_OUT_SEED
from tests.bench.report import RESULTS, machine

POLICIES = {"baseline": "privileged baseline", "blind": "PID + pure pursuit (traffic-blind)", "random": "random"}
CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "default.yaml"


def run_scenario(scenario: int, blocks: int, episodes: int, overrides: tuple[str, ...] = ()) -> dict[str, dict[int, dict[str, float]]]:
    from actors.baseline import baseline_for
    from actors.envs import make_env
    from actors.evaluator import evaluate
    from common.config import load_config

    cfg = load_config(CONFIG, [f"env.scenario={scenario}", *overrides])
    env = make_env(cfg)
    out: dict[str, dict[int, dict[str, float]]] = {who: {} for who in POLICIES}
    try:
        for k in range(blocks):
            rng = np.random.default_rng(k)
            policies = {"baseline": baseline_for(cfg, env.backend.dt, env.backend.surroundings),
                        "blind": baseline_for(cfg, env.backend.dt),
                        "random": lambda _: rng.uniform(-1, 1, 2).astype(np.float32)}
            for who, policy in policies.items():
                out[who][k] = evaluate(env, policy, episodes, HELD_OUT_SEED + episodes * k)
                print(scenario, k, who, {t: round(v, 3) for t, v in out[who][k].items()}, flush=True)
    finally:
        env.close()
    return out


def table(results: dict[int, dict[str, dict[int, dict[str, float]]]]) -> list[str]:
    rows = ["| scenario | policy | seed | success | collision | off-road | lane departure | timeout | stuck | "
            "lane invasions / episode | emergency-brake steps | route progress m (%) | mean speed m/s | return |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, by_policy in results.items():
        for who, by_block in by_policy.items():
            blocks = list(by_block.items())
            mean = {tag: float(np.mean([m[tag] for _, m in blocks])) for tag in blocks[0][1]}
            for k, m in [*blocks, ("mean", mean)]:
                g = lambda tag: m[f"eval/{tag}"]  # noqa: E731
                rows.append(f"| {scenario} | {POLICIES[who]} | {k} | {g('success_rate'):.2f} | {g('collision_rate'):.2f} | "
                            f"{g('termination_off_road'):.2f} | {g('termination_lane_departure'):.2f} | "
                            f"{g('termination_timeout'):.2f} | "
                            f"{g('termination_stuck'):.2f} | {g('avg_lane_invasions'):.2f} | {g('aeb_steps'):.2f} | "
                            f"{g('route_progress_m'):.0f} ({g('route_progress_pct'):.0f}%) | {g('mean_speed'):.2f} | "
                            f"{g('mean_reward'):.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.scenarios", description=__doc__)
    p.add_argument("--scenarios", default="0,1,2")
    p.add_argument("--blocks", type=int, default=3, help="evaluation seeds (blocks of --episodes held-out episodes)")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                   help="a config override for every policy (e.g. env.aeb_gap_m=2); repeatable")
    p.add_argument("--name", default="scenarios", help="report name: results/NAME.md and .json")
    args = p.parse_args()
    scenarios = [int(s) for s in args.scenarios.split(",")]
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(len(scenarios)) as pool:
        done = pool.starmap(run_scenario, [(s, args.blocks, args.episodes, tuple(args.overrides)) for s in scenarios])
    results = dict(zip(scenarios, done))
    e = args.episodes
    md = ["# The scenario ladder: reference policies", "",
          f"`python -m tests.bench.scenarios` on {machine()}, {time.strftime('%Y-%m-%d %H:%M')} "
          f"({(time.time() - start) / 60:.0f} min): embedded simulator, deploy/configs/default.yaml (route 300 m, "
          f"1,000 steps of 0.1 s, env.lane_change as each scenario's default: off on 0, on for 1 and 2)"
          + "".join(f", `--set {o}`" for o in args.overrides) + f". Evaluation seed k: the {e} held-out episodes "
          f"{HELD_OUT_SEED} + {e}k ... {HELD_OUT_SEED} + {e}k + {e - 1} (make experiment-learn's held-out set; disjoint "
          "from training episodes, seed + episode, and periodic evaluations, seed + 10000 + i). The two rule-based "
          "drivers are deterministic; the random policy draws uniform actions from a generator seeded with k. The "
          "privileged baseline was tuned on training seeds 0-19 of scenarios 1 and 2 only. Lane invasions: markings "
          "crossed per episode (a lane change and back is 2). Off-road, lane departure (only where the route is one "
          "lane), timeout and stuck: fractions of episodes that ended so. Emergency-brake steps: the share of steps "
          "env.aeb_gap_m braked (0 when off).", "", *table(results), ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
