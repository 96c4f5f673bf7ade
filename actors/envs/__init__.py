"""Driving environments behind the one contract of `common.env`.

Env slots: env j of rollout actor i has slot i * K + j (K = `actors.envs_per_actor`), the
evaluator the slot after the last rollout env's (serial mode: 0 for training, 1 for evaluation);
elastic actors beyond `actors.num_actors` skip the evaluator's. A CARLA env derives its server's
ports and GPU from its slot.
"""

from __future__ import annotations

import importlib
import logging

from common.config import Config, ConfigError
from common.driving import CARLA_FPS, ROUTE_TIME_MARGIN, route_time_margin
from common.env import DrivingEnv

log = logging.getLogger(__name__)


def step_seconds(cfg: Config) -> float:
    """Simulated seconds per env step of the configured backend."""
    return 1.0 / (CARLA_FPS if cfg.env.backend == "carla" else cfg.env.embedded.policy_frequency)


def check_backend(cfg: Config) -> None:
    """Fails at start, before anything is launched, for a backend that cannot be built; warns
    when the episode is too short for the route (smoke tests shorten episodes on purpose)."""
    e, dt = cfg.env, step_seconds(cfg)
    margin = route_time_margin(e, dt)
    if margin < ROUTE_TIME_MARGIN:
        log.warning("route completion is out of reach: env.max_episode_steps=%d x %.3f s = %.1f s, but "
                    "env.route_length_m=%.0f at env.reward.target_speed=%.1f m/s takes %.1f s (margin %.2f < %.2f); "
                    "eval/success_rate will stay at 0. Raise max_episode_steps or shorten the route.",
                    e.max_episode_steps, dt, e.max_episode_steps * dt,
                    e.route_length_m, e.reward.target_speed, e.route_length_m / e.reward.target_speed,
                    margin, ROUTE_TIME_MARGIN)
    if cfg.env.backend == "carla":
        try:
            importlib.import_module("carla")
        except ImportError as exc:
            raise ConfigError(f"env.backend=carla needs the 'carla' 0.9.16 client package "
                              f"(wheels for Python 3.10-3.12): {exc}") from exc
        if cfg.carla.route_file:
            from actors.envs.carla_env import load_route_file

            load_route_file(cfg.carla.route_file, cfg.env.route_length_m)


def rollout_slot(cfg: Config, actor: int, env: int) -> int:
    """The slot of env `env` of rollout actor `actor`, never the evaluator's."""
    slot = actor * cfg.actors.envs_per_actor + env
    return slot + 1 if slot >= eval_slot(cfg) else slot


def eval_slot(cfg: Config) -> int:
    """The evaluator's slot, after every rollout env's."""
    return cfg.actors.num_actors * cfg.actors.envs_per_actor


def make_env(cfg: Config, slot: int = 0, training: bool = False) -> DrivingEnv:
    """The env of `cfg.env.backend`, wrapped in the shared contract; `training` envs (the
    rollout's, not the evaluator's) honour `env.embedded.training_start`."""
    check_backend(cfg)
    if cfg.env.backend == "carla":
        from actors.envs.carla_env import CarlaBackend

        return DrivingEnv(CarlaBackend(cfg.env, cfg.carla, slot), cfg.env)
    from actors.envs.highway import HighwayBackend

    return DrivingEnv(HighwayBackend(cfg.env, cfg.env.embedded.training_start if training else "fixed"), cfg.env)
