"""Device profiles: the settings that depend on where the learner trains.

A run's device-dependent fields (`DEVICE_FIELDS`) default to None, "from the profile of
`learner.device`"; `load_config` fills those that neither the YAML file nor `--set` gave from the
profile below, so an explicit value always wins and the run's config, its TensorBoard text and
hparams hold the values it trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceProfile:
    """Defaults for one kind of learner device."""

    batch_size: int
    """td3.batch_size: transitions per update."""
    updates_per_step: float
    """learner.updates_per_step: updates per env step once learning has started."""
    learning_starts: int
    """td3.learning_starts: env steps of uniform random actions before the first update."""
    envs_per_actor: int
    """actors.envs_per_actor: envs each rollout actor steps with one batched forward."""
    threads: int
    """learner.threads: torch CPU threads of the learner (0: what a local cluster's actors leave)."""


DEVICE_FIELDS = {
    "batch_size": "td3.batch_size",
    "updates_per_step": "learner.updates_per_step",
    "learning_starts": "td3.learning_starts",
    "envs_per_actor": "actors.envs_per_actor",
    "threads": "learner.threads",
}
"""Profile attribute -> the config field it fills."""

PROFILES = {
    # What the learning experiments measured on 2 CPU cores (README › The learning experiment):
    # a batch-64 update takes ~130 ms there, so the learner sets the pace and 0.5 updates per env
    # step from step 1,000 gave policies that complete the evaluation routes at 10,000-15,000 env
    # steps. One env per actor: more env throughput would only wait for the learner. The learner
    # keeps the cores the actors leave it.
    "cpu": DeviceProfile(batch_size=64, updates_per_step=0.5, learning_starts=1000, envs_per_actor=1, threads=0),
    # What the GPU benches support, not measured on a GPU: batch 256, as `make bench-learner` times
    # the update; one update per env step from step 5,000; 8 envs per actor, which `make
    # bench-scaling` found the best per-core rate short of 64 (0.64x the raw env against 0.59x with
    # 4 and 0.46x with 1, float32, 2026-12-05), since a GPU learner waits for the actors; one CPU
    # thread, since the update runs on the GPU and further threads only take the actors' cores.
    "cuda": DeviceProfile(batch_size=256, updates_per_step=1.0, learning_starts=5000, envs_per_actor=8, threads=1),
}


def device_kind(device: str) -> str:
    """'cpu' or 'cuda' for a `learner.device` value; auto asks torch whether CUDA is available."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _get(cfg: Any, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def apply_profile(cfg: Any) -> None:
    """Fills every unset (None) device-dependent field of `cfg` from its device's profile."""
    unset = [(attr, dotted) for attr, dotted in DEVICE_FIELDS.items() if _get(cfg, dotted) is None]
    if not unset:
        return
    profile = asdict(PROFILES[device_kind(cfg.learner.device)])
    for attr, dotted in unset:
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, profile[attr])


def describe(cfg: Any) -> str:
    """One line for the start of a run: the profile and the device-dependent values it runs with,
    those that differ from the profile marked as set."""
    kind = device_kind(cfg.learner.device)
    profile = asdict(PROFILES[kind])
    values = []
    for attr, dotted in DEVICE_FIELDS.items():
        value = _get(cfg, dotted)
        values.append(f"{dotted}={value}" + (" (set)" if value != profile[attr] else ""))
    device = cfg.learner.device if cfg.learner.device == kind else f"{cfg.learner.device} -> {kind}"
    return f"device profile {kind} (learner.device={device}): " + ", ".join(values)
