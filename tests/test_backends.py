"""The backend registry: a toy backend registered here, and named to nothing else, runs in serial
and in distributed mode, and its metric reaches TensorBoard the same way in both. This module is
the toy's `env.backend_module`: Ray's workers import it to make their envs."""

import math

import pytest
import ray

from actors.envs import backend_spec, check_backend, make_env
from actors.envs.highway import HighwayBackend
from common.backends import BackendSpec, aggregate, register, registered
from common.config import ConfigError, for_display, load_config
from common.metrics import read_scalars
from learner.cli import main
from learner.distributed import DistributedRun, worker_cpus
from tests.test_distributed import FAST
from tests.test_serial import SMOKE


class ToyBackend:
    """The embedded simulator under another name, counting its resets as a health metric."""

    def __init__(self, cfg, training: bool) -> None:
        self.inner = HighwayBackend(cfg.env, cfg.env.embedded.training_start if training else "fixed")
        self.dt = self.inner.dt
        self.resets = 0

    def reset(self, seed):
        self.resets += 1
        return self.inner.reset(seed)

    def step(self, action):
        return self.inner.step(action)

    def surroundings(self):
        return self.inner.surroundings()

    def render_rgb(self):
        return self.inner.render_rgb()

    def metrics(self) -> dict[str, float]:
        return {"toy_resets": float(self.resets)}

    def close(self) -> None:
        self.inner.close()


TOY = register(BackendSpec(
    name="toy",
    make=lambda cfg, slot, training: ToyBackend(cfg, training),
    step_seconds=lambda cfg: 1.0 / cfg.env.embedded.policy_frequency,
    max_steer_rad=math.pi / 4,
    metrics={"actors/toy_resets": "sum"},
    server_cpus=lambda cfg: 0.5,
))
USE_TOY = ["env.backend=toy", "env.backend_module=tests.test_backends"]


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_the_registry_answers_for_the_backend():
    cfg = load_config(overrides=USE_TOY)
    assert backend_spec(cfg) is TOY and set(registered()) >= {"embedded", "carla", "toy"}
    assert worker_cpus(cfg, 4) == cfg.actors.num_cpus + 2.0
    assert "carla" not in for_display(cfg) and "embedded" not in for_display(cfg)["env"]
    env = make_env(cfg)
    try:
        env.reset(seed=0)
        assert aggregate(TOY, [env.backend.metrics(), {}, {"toy_resets": 2.0}]) == {"actors/toy_resets": 3.0}
    finally:
        env.close()
    with pytest.raises(ConfigError, match="'nowhere' is not a registered backend; choose one of .*'toy'"):
        check_backend(load_config(overrides=["env.backend=nowhere"]))
    with pytest.raises(ConfigError, match="env.backend_module='no.such.module' cannot be imported"):
        check_backend(load_config(overrides=["env.backend=nowhere", "env.backend_module=no.such.module"]))
    with pytest.raises(ValueError, match="start with 'actors/'"):
        register(BackendSpec(name="bad", make=TOY.make, step_seconds=TOY.step_seconds, max_steer_rad=1.0,
                             metrics={"toy_resets": "sum"}))


def test_a_registered_backends_metric_reaches_tensorboard_in_serial_mode(tmp_path):
    args = [*SMOKE, "--max-timesteps", "200", "--logdir", str(tmp_path)]
    assert main([*args, *(a for o in USE_TOY for a in ("--set", o))]) == 0
    (run_dir,) = tmp_path.glob("*_toy_*")
    resets = [value for _, _, value in read_scalars(run_dir)["actors/toy_resets"]]
    assert resets and resets[-1] >= 1


def test_a_registered_backends_metric_reaches_tensorboard_in_distributed_mode(tmp_path):
    cfg = load_config(overrides=[*FAST, *USE_TOY, "actors.num_actors=1", "learner.max_timesteps=200",
                                 "eval.references=false"])
    DistributedRun(cfg, tmp_path / "run").init().run()
    resets = [value for _, _, value in read_scalars(tmp_path / "run")["actors/toy_resets"]]
    assert resets and resets[-1] >= 1
