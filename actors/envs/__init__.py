"""Driving environments behind the one contract of `common.env`."""

from __future__ import annotations

from common.config import Config, ConfigError
from common.env import DrivingEnv


def check_backend(cfg: Config) -> None:
    """Fails at start, before anything is launched, for a backend that cannot be built."""
    if cfg.env.backend != "embedded":
        raise ConfigError(
            "env.backend='carla' needs the CARLA backend, which is not implemented yet (issue #5); "
            "use env.backend=embedded"
        )


def make_env(cfg: Config) -> DrivingEnv:
    """The env of `cfg.env.backend`, wrapped in the shared contract."""
    check_backend(cfg)
    from actors.envs.highway import HighwayBackend

    return DrivingEnv(HighwayBackend(cfg.env), cfg.env)
