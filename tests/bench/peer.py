"""The peer library in our experiments: Stable-Baselines3 TD3 on our driving env.

`sb3-cnn` sees what our agent sees (MultiInputPolicy with our normalized NatureCNN on the frames,
concatenated with the 53-d vector, 256-256 heads, separate actor and critic extractors);
`sb3-vector` sees the 53-d vector only (MlpPolicy, 256-256); `sb3-vector+traffic` the vector with
the 8 nearest vehicles' true kinematics in it (`env.traffic_features`), the traffic a vector-only
learner otherwise cannot see. Same env, budget, learning start,
batch, updates per env step and training seeds as our arms; evaluated with our evaluator on the
same held-out seeds.

    python -m tests.bench.peer --arm sb3-vector --seed 1 --steps 10000 --out results/experiment_learn/sb3-vector/s1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from actors.envs import make_env
from actors.evaluator import evaluate
from common.config import Config, load_config
from common.networks import FEATURE_DIM, NatureCNN

PEERS: dict[str, tuple[bool, list[str]]] = {
    "sb3-cnn": (False, []),  # (the vector alone, config overrides)
    "sb3-vector": (True, []),
    "sb3-vector+traffic": (True, ["env.traffic_features=8"]),
}


def features_extractor_class() -> type:
    """Our NatureCNN on the image, concatenated with the vector: what our heads see."""
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class OurFeatures(BaseFeaturesExtractor):
        def __init__(self, space: gym.spaces.Dict) -> None:
            super().__init__(space, features_dim=FEATURE_DIM + space["vector"].shape[0])
            self.cnn = NatureCNN("layernorm")

        def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([self.cnn(obs["image"]), obs["vector"]], dim=1)

    return OurFeatures


class VectorOnly(gym.ObservationWrapper):
    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = env.observation_space["vector"]

    def observation(self, observation: dict) -> np.ndarray:
        return observation["vector"]


def train_and_evaluate(arm: str, cfg: Config, steps: int, episodes: int, eval_seed: int, out: Path) -> dict:
    from stable_baselines3 import TD3
    from stable_baselines3.common.noise import NormalActionNoise

    t = cfg.td3
    env = make_env(cfg)
    vector_only = PEERS[arm][0]
    if vector_only:
        env = VectorOnly(env)
        policy, kwargs = "MlpPolicy", {"net_arch": [256, 256]}
    else:
        policy = "MultiInputPolicy"
        kwargs = {"features_extractor_class": features_extractor_class(), "net_arch": [256, 256],
                  "normalize_images": False, "share_features_extractor": False}
    # updates_per_step < 1 becomes one gradient step every 1/updates_per_step env steps.
    ups = cfg.learner.updates_per_step
    train_freq, gradient_steps = (round(1 / ups), 1) if ups < 1 else (1, round(ups))
    model = TD3(policy, env, learning_rate=t.mlp_lr, buffer_size=min(cfg.replay.capacity, steps), batch_size=t.batch_size,
                learning_starts=t.learning_starts, tau=t.tau, gamma=t.gamma, train_freq=train_freq,
                gradient_steps=gradient_steps, policy_delay=t.policy_delay, target_policy_noise=t.policy_noise,
                target_noise_clip=t.noise_clip, action_noise=NormalActionNoise(np.zeros(2), np.full(2, 0.1)),
                policy_kwargs=kwargs, seed=cfg.seed, device="cpu", verbose=0)
    start = time.time()
    model.learn(total_timesteps=steps)
    train_s = time.time() - start
    eval_env = make_env(cfg, slot=1)
    wrap = (lambda o: o["vector"]) if vector_only else (lambda o: o)
    try:
        metrics = evaluate(eval_env, lambda o: model.predict(wrap(o), deterministic=True)[0], episodes, eval_seed)
    finally:
        eval_env.close()
        env.close()
    result = {"final": metrics, "train_s": train_s}
    out.mkdir(parents=True, exist_ok=True)
    (out / "final.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.peer")
    p.add_argument("--arm", choices=list(PEERS), required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--eval-seed", type=int, default=100_000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(overrides=[*args.overrides, *PEERS[args.arm][1], f"seed={args.seed}"])
    result = train_and_evaluate(args.arm, cfg, args.steps, args.episodes, args.eval_seed, args.out)
    print(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.items()}))


if __name__ == "__main__":
    main()
