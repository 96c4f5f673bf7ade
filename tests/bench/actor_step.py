"""How far one actor update moves the policy, and how uniformly over states: the mechanism of
the action lock (results/README.md).

Real observations from the embedded env (random driving), a fresh agent of each arrangement,
then actor updates against its freshly initialised critic. Per update: mean |dz| (z the actor's
pre-tanh output) over held-out states, and the coherence |mean dz| / mean |dz| per action
dimension (1: every state moved the same way, as one bias shift; 0: state-dependent moves).

    python -m tests.bench.actor_step
"""

from __future__ import annotations

import numpy as np
import torch

from actors.envs import make_env
from common.batch import Batch
from common.config import load_config
from learner.td3 import TD3

ARRANGEMENTS = {
    "seeds (raw 512 features)": ["cnn.trunk_dim=0", "td3.weight_decay_style=l2", "td3.actor_encoder=own"],
    "trunk 50": ["td3.actor_encoder=own"],
}


def observations(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    env = make_env(load_config())
    rng = np.random.default_rng(seed)
    images, vectors = [], []
    obs, _ = env.reset(seed=seed)
    for k in range(n):
        images.append(obs["image"])
        vectors.append(obs["vector"])
        obs, _, term, trunc, _ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        if term or trunc:
            obs, _ = env.reset(seed=seed + k + 1)
    env.close()
    return {"image": np.stack(images), "vector": np.stack(vectors)}


def main(updates: int = 10, batch: int = 64) -> None:
    torch.set_num_threads(1)
    obs = observations(2 * batch)
    train = {k: v[:batch] for k, v in obs.items()}
    probe = {k: torch.from_numpy(v[batch:]) for k, v in obs.items()}
    arrays = {"image": train["image"], "vector": train["vector"], "action": np.zeros((batch, 2), np.float32),
              "reward": np.zeros(batch, np.float32), "next_image": train["image"], "next_vector": train["vector"],
              "done": np.zeros(batch, np.float32)}
    for name, overrides in ARRANGEMENTS.items():
        torch.manual_seed(0)
        agent = TD3(load_config(overrides=["learner.device=cpu", "td3.critic_warmup_updates=0", *overrides]),
                    torch.device("cpu"))
        b = Batch.from_numpy(arrays, torch.device("cpu"))
        moves, coherence = [], []
        with torch.no_grad():
            z = agent.actor.head.pre_tanh(agent.actor.cnn(probe["image"]), probe["vector"])
        for _ in range(updates):
            agent.update_actor(b)
            with torch.no_grad():
                z_new = agent.actor.head.pre_tanh(agent.actor.cnn(probe["image"]), probe["vector"])
            dz = z_new - z
            moves.append(float(dz.abs().mean()))
            coherence.append(float((dz.mean(0).abs() / dz.abs().mean(0)).min()))
            z = z_new
        print(f"{name:26s} mean |dz| per update: {np.mean(moves):.3f} (first {moves[0]:.3f}, last {moves[-1]:.3f}); "
              f"after {updates} updates |z| = {float(z.abs().mean()):.2f}; coherence (worst dim) {np.mean(coherence):.2f}")


if __name__ == "__main__":
    main()
