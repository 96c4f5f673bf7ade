"""The normalized NatureCNN and the TD3 actor/critic heads.

NatureCNN: conv 32@8x8/4 -> 64@4x4/2 -> 64@3x3/1 -> FC 512, each followed by
LayerNorm (over [C, H, W] for convs) *before* LeakyReLU(0.01), as the seeds prescribe
(`norm="none"` drops the LayerNorms for the ablation). Frames arrive as uint8 and are scaled to
[-1, 1] inside the model, on whatever device it lives, so replay and transport never hold floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Config
from common.driving import ACTION_DIM, FRAME_SIZE, FRAME_STACK, VECTOR_DIM, vector_dim

FEATURE_DIM = 512
HIDDEN_DIM = 256
LEAKY_SLOPE = 0.01
CONV_SHAPES = ((32, 20, 20), (64, 9, 9), (64, 7, 7))
FLAT_DIM = 64 * 7 * 7  # 3136


def frames_to_float(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1] in `dtype` (scaled in float32 first, so both dtypes see the same values)."""
    return frames.float().mul_(1.0 / 127.5).sub_(1.0).to(dtype)


class NatureCNN(nn.Module):
    """(B, 4, 84, 84) uint8 or float in [-1, 1] -> (B, 512) features."""

    def __init__(self, norm: str = "layernorm") -> None:
        super().__init__()
        if norm not in ("layernorm", "none"):
            raise ValueError(f"cnn norm must be 'layernorm' or 'none', got {norm!r}")
        self.conv1 = nn.Conv2d(FRAME_STACK, 32, kernel_size=8, stride=4)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=4, stride=2)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, stride=1)
        self.fc = nn.Linear(FLAT_DIM, FEATURE_DIM)

        def make_norm(shape: tuple[int, ...] | int) -> nn.Module:
            return nn.LayerNorm(shape) if norm == "layernorm" else nn.Identity()

        self.ln1, self.ln2, self.ln3 = (make_norm(list(s)) for s in CONV_SHAPES)
        self.ln4 = make_norm(FEATURE_DIM)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: bfloat16 in a bfloat16 rollout policy (`actors.inference_dtype`);
        float32 under autocast, which casts per operation."""
        return self.conv1.weight.dtype

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames_to_float(frames, self.dtype) if frames.dtype == torch.uint8 else frames
        if x.shape[1:] != (FRAME_STACK, FRAME_SIZE, FRAME_SIZE):
            raise ValueError(f"expected (B, {FRAME_STACK}, {FRAME_SIZE}, {FRAME_SIZE}) frames, got {tuple(x.shape)}")
        x = F.leaky_relu(self.ln1(self.conv1(x)), LEAKY_SLOPE)
        x = F.leaky_relu(self.ln2(self.conv2(x)), LEAKY_SLOPE)
        x = F.leaky_relu(self.ln3(self.conv3(x)), LEAKY_SLOPE)
        x = torch.flatten(x, 1)
        return F.leaky_relu(self.ln4(self.fc(x)), LEAKY_SLOPE)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, HIDDEN_DIM), nn.ReLU(), nn.Linear(HIDDEN_DIM, HIDDEN_DIM), nn.ReLU(), nn.Linear(HIDDEN_DIM, out_dim)
    )


def _trunk(trunk_dim: int) -> nn.Module:
    """512 features -> `trunk_dim` values in [-1, 1] (DrQ-v2's Linear -> LayerNorm -> Tanh), or the
    features unchanged when `trunk_dim` is 0.

    Without it the heads' first layer sums 512 LayerNormed, mostly positive features of L2 ~17
    that differ little between frames early on; Adam moves every weight by ~lr in the sign of its
    tiny gradient, so one actor update shifts the pre-tanh output by ~0.24 for every state alike
    and tanh saturates within ~10 actor updates. The trunk cuts that shift about 4x
    (`python -m tests.bench.actor_step`); alone it only delays the action lock (results/README.md)."""
    if trunk_dim == 0:
        return nn.Identity()
    return nn.Sequential(nn.Linear(FEATURE_DIM, trunk_dim), nn.LayerNorm(trunk_dim), nn.Tanh())


class ActorHead(nn.Module):
    """[trunk(CNN features) (50, or 512 without a trunk), vector (`vector_dim`)] -> 256 -> 256 -> 2, tanh."""

    def __init__(self, trunk_dim: int = 0, vector_dim: int = VECTOR_DIM) -> None:
        super().__init__()
        self.trunk = _trunk(trunk_dim)
        self.net = _mlp((trunk_dim or FEATURE_DIM) + vector_dim, ACTION_DIM)

    def pre_tanh(self, features: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """The action before its tanh squashing (what saturates when the actor locks)."""
        return self.net(torch.cat([self.trunk(features), vector], dim=1))

    def forward(self, features: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pre_tanh(features, vector))


class CriticHeads(nn.Module):
    """One trunk shared by one or two Q heads, each [trunk(features), vector, action] -> 256 -> 256 -> 1."""

    def __init__(self, num_q: int = 2, trunk_dim: int = 0, vector_dim: int = VECTOR_DIM) -> None:
        super().__init__()
        self.trunk = _trunk(trunk_dim)
        self.qs = nn.ModuleList(_mlp((trunk_dim or FEATURE_DIM) + vector_dim + ACTION_DIM, 1) for _ in range(num_q))

    def forward(self, features: torch.Tensor, vector: torch.Tensor, action: torch.Tensor) -> list[torch.Tensor]:
        x = torch.cat([self.trunk(features), vector, action], dim=1)
        return [q(x).squeeze(1) for q in self.qs]


class Policy(nn.Module):
    """Actor CNN + actor head: what actors run and what the learner publishes."""

    def __init__(self, norm: str = "layernorm", trunk_dim: int = 0, vector_dim: int = VECTOR_DIM) -> None:
        super().__init__()
        self.cnn = NatureCNN(norm)
        self.head = ActorHead(trunk_dim, vector_dim)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """Takes uint8 frames and a float32 vector whatever the policy's own dtype."""
        return self.head(self.cnn(image), vector.to(self.cnn.dtype))


class Critic(nn.Module):
    """Critic CNN shared by the Q heads."""

    def __init__(self, norm: str = "layernorm", num_q: int = 2, trunk_dim: int = 0, vector_dim: int = VECTOR_DIM) -> None:
        super().__init__()
        self.cnn = NatureCNN(norm)
        self.heads = CriticHeads(num_q, trunk_dim, vector_dim)

    def forward(self, image: torch.Tensor, vector: torch.Tensor, action: torch.Tensor) -> list[torch.Tensor]:
        return self.heads(self.cnn(image), vector, action)


def policy_for(cfg: Config) -> Policy:
    """The policy network a config describes (actors, evaluator and learner build the same one)."""
    return Policy(cfg.cnn.norm, cfg.cnn.trunk_dim, vector_dim(cfg.env))
