"""Driving environments behind the one contract of `common.env`.

Env slots: env j of rollout actor i has slot i * K + j (K = `actors.envs_per_actor`), the
evaluator the slot after the last rollout env's (serial mode: 0 for training, 1 for evaluation);
elastic actors beyond `actors.num_actors` skip the evaluator's. A CARLA env derives its server's
ports and GPU from its slot.
"""

from __future__ import annotations

import importlib
import logging
import math

from actors.envs import carla_env, highway  # noqa: F401  (each registers its backend)
from common.backends import BackendSpec, registered
from common.config import Config, ConfigError
from common.driving import ROUTE_TIME_MARGIN, route_time_margin
from common.env import DrivingEnv

log = logging.getLogger(__name__)


def backend_spec(cfg: Config) -> BackendSpec:
    """The registered backend named by env.backend, after importing env.backend_module when set."""
    e = cfg.env
    if e.backend_module:
        try:
            importlib.import_module(e.backend_module)
        except ImportError as exc:
            raise ConfigError(f"env.backend_module='{e.backend_module}' cannot be imported: {exc}") from exc
    spec = registered().get(e.backend)
    if spec is None:
        raise ConfigError(f"env.backend='{e.backend}' is not a registered backend; choose one of "
                          f"{sorted(registered())}, or set env.backend_module to the module that registers it")
    return spec


def step_seconds(cfg: Config) -> float:
    """Simulated seconds per env step of the configured backend."""
    return backend_spec(cfg).step_seconds(cfg)


def check_backend(cfg: Config) -> None:
    """Fails at start, before anything is launched, for a backend that cannot be built; warns
    when the episode is too short for the route (smoke tests shorten episodes on purpose)."""
    spec = backend_spec(cfg)
    e, dt = cfg.env, spec.step_seconds(cfg)
    margin = route_time_margin(e, dt)
    if margin < ROUTE_TIME_MARGIN:
        log.warning("route completion is out of reach: env.max_episode_steps=%d x %.3f s = %.1f s, but "
                    "env.route_length_m=%.0f at env.reward.target_speed=%.1f m/s takes %.1f s (margin %.2f < %.2f); "
                    "eval/success_rate will stay at 0. Raise max_episode_steps or shorten the route.",
                    e.max_episode_steps, dt, e.max_episode_steps * dt,
                    e.route_length_m, e.reward.target_speed, e.route_length_m / e.reward.target_speed,
                    margin, ROUTE_TIME_MARGIN)
    spec.check(cfg)


def rollout_slot(cfg: Config, actor: int, env: int) -> int:
    """The slot of env `env` of rollout actor `actor`, never the evaluator's."""
    slot = actor * cfg.actors.envs_per_actor + env
    return slot + 1 if slot >= eval_slot(cfg) else slot


def noise_scale(cfg: Config, slot: int) -> float:
    """The exploration-noise multiplier of rollout env `slot`, Ape-X style: the run's n =
    num_actors x envs_per_actor envs spread geometrically from `actors.noise_scale_min` to
    `noise_scale_max` (one env: their geometric mean). Slots past n, of elastic actors beyond
    num_actors, repeat the spread from its start."""
    a = cfg.actors
    n, low, high = a.num_actors * a.envs_per_actor, a.noise_scale_min, a.noise_scale_max
    if n == 1:
        return math.sqrt(low * high)
    return float(low * (high / low) ** ((slot % n) / (n - 1)))


def eval_slot(cfg: Config) -> int:
    """The evaluator's slot, after every rollout env's."""
    return cfg.actors.num_actors * cfg.actors.envs_per_actor


def make_env(cfg: Config, slot: int = 0, training: bool = False) -> DrivingEnv:
    """The env of `cfg.env.backend`, wrapped in the shared contract; `training` envs (the
    rollout's, not the evaluator's) honour `env.embedded.training_start`."""
    check_backend(cfg)
    return DrivingEnv(backend_spec(cfg).make(cfg, slot, training), cfg.env)
