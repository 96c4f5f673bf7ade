"""The CPUs the learner reserves in Ray for the rollout workers and the evaluator: `actors.num_cpus`
each, plus a core for every CARLA server a worker launches (in synchronous mode a server busy-waits
for the next tick), in the workers' Ray options and in the cores a local learner leaves them."""

from __future__ import annotations

from pathlib import Path

from actors.rollout import RolloutWorker
from common.config import load_config
from learner import distributed
from learner.distributed import DistributedRun, start_ray, worker_cpus

CARLA_YAML = Path(__file__).resolve().parents[1] / "deploy/configs/carla.yaml"


def test_a_worker_reserves_a_cpu_per_carla_server_it_launches():
    carla = load_config(CARLA_YAML)  # actors.num_cpus 1.0
    assert worker_cpus(carla, 1) == 2.0 and worker_cpus(carla, 3) == 4.0
    assert worker_cpus(load_config(CARLA_YAML, ["carla.server_cpus=4"]), 2) == 9.0  # pinned servers: their CPUs
    assert worker_cpus(load_config(CARLA_YAML, ["carla.launch=false"]), 3) == 1.0  # servers run elsewhere
    assert worker_cpus(load_config(), 4) == 0.5  # the embedded simulator runs in the actor


def test_ray_options_and_the_learners_threads_count_the_servers(tmp_path, monkeypatch):
    cfg = load_config(CARLA_YAML, ["actors.num_actors=2", "actors.envs_per_actor=2", "actors.num_gpus=0.25",
                                   "learner.threads=0"])  # 0: the cores the workers leave
    options: dict[str, dict] = {}

    class Remote:
        def __init__(self, cls: type) -> None:
            self.name = cls.__name__

        def options(self, **kwargs):
            options[self.name] = kwargs
            return self

        def remote(self, *args):
            return None

    threads: list[int] = []
    monkeypatch.setattr(distributed.ray, "remote", Remote)
    monkeypatch.setattr(distributed.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(distributed.torch, "set_num_threads", threads.append)
    start_ray(cfg)
    assert threads == [16 - (2 * (1 + 2) + (1 + 1))]  # 2 actors with 2 servers each, the evaluator with 1
    run = DistributedRun(cfg, tmp_path)
    run._remote(RolloutWorker, 2)
    run._make_evaluator()
    quiet = {"enable_task_events": False}  # Ray's GCS would keep every call's events (docs/benchmarks.md › Soak)
    assert options == {"RolloutWorker": {"num_cpus": 3.0, "num_gpus": 0.25, "resources": {"carla": 1.0}, **quiet},
                       "EvalWorker": {"num_cpus": 2.0, "num_gpus": 0.25, "resources": {"carla": 1.0}, **quiet}}
