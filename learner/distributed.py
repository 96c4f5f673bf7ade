"""Distributed mode: Ray rollout actors and an evaluator feed this learner through the Redis
replay service; the learner publishes versioned weights through Ray's object store.

    actors (Ray, CPU) --chunks--> Redis stream --poll--> ring --batches--> TD3 (learner device)
        ^                                                                     |
        +---------------- weights (safetensors bytes, one put, many gets) ----+
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.envs import backend_spec
from actors.evaluator import EvalWorker
from actors.rollout import RolloutWorker
from common.backends import aggregate
from common.config import Config
from common.weights import WeightStore, policy_to_bytes
from learner.core import TrainingCore
from learner.supervisor import ActorSupervisor

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # weights are ~13 MB a version; the default 30% of RAM is waste
PERF_EVERY_S = 5.0
TRAIN_SLICE_S = 0.25


def worker_cpus(cfg: Config, envs: int) -> float:
    """CPUs a Ray worker stepping `envs` envs reserves: `actors.num_cpus` for itself and its env
    clients, and what each env's simulator server needs beside it (a launched CARLA server's
    `carla.server_cpus`, at least one: in synchronous mode its game thread busy-waits for the next
    tick, so it holds a core of its own even while the actor waits for it, and Ray must not place
    more servers on a node than it has cores)."""
    return cfg.actors.num_cpus + envs * backend_spec(cfg).server_cpus(cfg)


def start_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    if cfg.learner.ray_address:
        ray.init(address=cfg.learner.ray_address, log_to_driver=True)
        return
    if not cfg.learner.threads:
        # On a local cluster the learner shares the cores with the actors and their servers: leave them theirs.
        a = cfg.actors
        reserved = a.num_actors * worker_cpus(cfg, a.envs_per_actor) + worker_cpus(cfg, 1)  # the evaluator steps one env
        torch.set_num_threads(max(1, int((os.cpu_count() or 1) - reserved)))
    ray.init(
        # "local": without an address, ray.init joins the cluster a `ray start` on this machine left
        # in /tmp/ray/ray_current_cluster, if any, and then refuses object_store_memory.
        address="local",
        include_dashboard=cfg.learner.ray_dashboard,
        dashboard_host="127.0.0.1",
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        log_to_driver=True,
    )


class DistributedRun:
    """`init()` starts Ray, the replay service, the actors and the evaluator; `run()` trains."""

    def __init__(self, cfg: Config, run_dir: Path, resume: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.stop_requested = False

    def init(self) -> "DistributedRun":
        cfg = self.cfg
        start_ray(cfg)
        self.core = TrainingCore(cfg, self.run_dir, self.resume, via_redis=True)
        cfg_dict = dataclasses.asdict(cfg)
        self.store = ray.remote(WeightStore).options(num_cpus=0, enable_task_events=False).remote()
        self.version = int(self.core.saved.get("weights_version", 0))
        self._publish()
        a = cfg.actors
        k = a.envs_per_actor
        remote_worker = self._remote(RolloutWorker, k)
        url = self.core.replay.url

        def make(index: int, incarnation: int) -> Any:
            return remote_worker.remote(cfg_dict, index, incarnation, url, self.store)

        self.actors = ActorSupervisor(make, self._wanted_actors(), a.restart_backoff_s, a.max_consecutive_deaths)
        self.evaluator = self._make_evaluator()
        self.eval_future: Any = None
        self.eval_step = 0
        self.eval_updates = -1  # the learner updates of the weights the last evaluation launched judges
        self.judged: tuple[int, list[torch.Tensor]] | None = None
        """With `learner.stop_at_success`: the agent (updates, every tensor) the evaluation in flight judges."""
        self.reached = False  # an evaluation reached learner.stop_at_success: the run ends on its weights
        self.actor_steps: dict[int, int] = {}  # env steps per actor since the last perf log
        self.holds = 0  # loop passes in which idle actors waited for the learner
        self.owed = 0.0  # updates owed for the env steps reported so far
        self.actor_versions: dict[int, int] = {}
        self.reports: dict[int, dict[str, Any]] = {}  # each actor's latest report: its counters
        dashboard = "the head node's, port 8265" if cfg.learner.ray_address else (
            "http://127.0.0.1:8265" if cfg.learner.ray_dashboard else "off")
        log.info("%d rollout actors (%d env%s each) + 1 evaluator on Ray (dashboard: %s)",
                 a.num_actors, k, "" if k == 1 else "s", dashboard)
        return self

    def _wanted_actors(self) -> int:
        """`actors.num_actors`, or with `actors.elastic_resource` what the live nodes have room for."""
        a = self.cfg.actors
        if not a.elastic_resource:
            return a.num_actors
        total = ray.cluster_resources().get(a.elastic_resource, 0.0)
        return max(int(total // a.resources[a.elastic_resource]) - 1, 0)  # one share is the evaluator's

    def _rescale(self) -> None:
        _, retired = self.actors.resize(self._wanted_actors())
        for index in retired:
            self.actor_versions.pop(index, None)  # its last report's counters stay in the totals

    def _remote(self, worker: type, envs: int) -> Any:
        """The Ray actor class of `worker`, a rollout worker or the evaluator, stepping `envs` envs:
        its CPUs (`worker_cpus`), its GPU share and `actors.resources` (a CARLA node for CARLA)."""
        a = self.cfg.actors
        # Without task events: Ray's GCS keeps ~3.3 KB of them per actor call, up to 100,000 calls
        # (~330 MB), so the reports of a long run grew it by 22 MB/hour (`make soak`).
        return ray.remote(worker).options(num_cpus=worker_cpus(self.cfg, envs), num_gpus=a.num_gpus,
                                          resources=a.resources or None, enable_task_events=False)

    def _make_evaluator(self) -> Any:
        return self._remote(EvalWorker, 1).remote(dataclasses.asdict(self.cfg))

    def _publish_new(self) -> None:
        """The agent's current policy as the next weights version."""
        self.version += 1
        self._publish()

    def _publish(self) -> None:
        self.published_updates = self.core.agent.updates
        start = time.perf_counter()
        ref = ray.put(policy_to_bytes(self.core.agent.actor))
        self.weights_ref = ref
        self.store.publish.remote(self.version, [ref])
        self.core.logger.log({"perf/weight_broadcast_ms": 1000 * (time.perf_counter() - start)}, self.core.env_step)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        cfg, core = self.cfg, self.core
        previous = signal.signal(signal.SIGINT, self._request_stop)
        next_eval = self._next_multiple(cfg.eval.freq)
        next_ckpt = self._next_multiple(cfg.learner.checkpoint_freq)
        last_perf = last_rescale = time.monotonic()
        try:
            while core.env_step < cfg.learner.max_timesteps and not self.stop_requested and not self.reached:
                new_steps = self._collect_reports()
                if core.env_step > cfg.td3.learning_starts:
                    self.owed += new_steps * cfg.learner.updates_per_step
                core.replay.poll()
                # Decided on the debt that includes the reports just read (a burst of them must
                # not also start new work), and only while the learner can work the debt down:
                # never a deadlock.
                debt = cfg.learner.max_update_debt
                self._hand_out_work(hold=bool(debt) and self.owed > debt and core.learner.ready(core.env_step))
                self.owed = self._train(self.owed)
                if cfg.eval.freq and core.env_step >= next_eval:
                    if self._launch_eval():
                        next_eval = self._next_multiple(cfg.eval.freq)
                if self._collect_eval(wait=False):
                    self._judge()
                if core.env_step >= next_ckpt:
                    self._checkpoint()
                    next_ckpt = self._next_multiple(cfg.learner.checkpoint_freq)
                if cfg.actors.elastic_resource and time.monotonic() - last_rescale > cfg.actors.elastic_check_s:
                    self._rescale()
                    last_rescale = time.monotonic()
                if time.monotonic() - last_perf > PERF_EVERY_S:
                    self._log_perf()
                    last_perf = time.monotonic()
                if new_steps == 0 and self.owed < 1:
                    time.sleep(0.005)
            self._finish()
        finally:
            signal.signal(signal.SIGINT, previous)
            self.close()
        return core.last_eval

    def _request_stop(self, *_: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        log.warning("stopping: finishing the current step, writing a checkpoint (Ctrl-C again to abort)")

    def _next_multiple(self, every: int) -> int:
        return (self.core.env_step // every + 1) * every if every else sys.maxsize

    def _collect_reports(self) -> int:
        """Reads the actors' reports; returns the env steps they add."""
        core, actors = self.core, self.actors
        new_steps = 0
        for index, report in actors.collect():
            new_steps += report["steps"]
            core.env_step += report["steps"]
            for episode in report["episodes"]:
                core.log_episode(episode)
            self.actor_steps[index] = self.actor_steps.get(index, 0) + report["steps"]
            self.actor_versions[index] = report["policy_version"]
            self.reports[index] = report
        actors.restart_due()
        return new_steps

    def _hand_out_work(self, hold: bool) -> None:
        """Gives idle actors their next report's steps, unless `hold` (the learner is too far behind)."""
        if hold:
            self.holds += 1
            return
        for index in self.actors.idle():
            self.actors.launch(index, self.cfg.actors.steps_per_report, self.core.env_step)

    def _train(self, credit: float) -> float:
        """Updates for at most TRAIN_SLICE_S, so reports and the replay keep being read."""
        core = self.core
        start = time.perf_counter()
        while credit >= 1.0 and time.perf_counter() - start < TRAIN_SLICE_S and core.learner.ready(core.env_step):
            core.learner.step(core.env_step)
            credit -= 1.0
            if core.agent.updates % self.cfg.learner.weight_sync_interval == 0:
                self._publish_new()
        return credit

    def _launch_eval(self) -> bool:
        if self.eval_future is not None:
            return False
        agent = self.core.agent
        if self.cfg.learner.stop_at_success:
            # The run may end on the weights this evaluation judges: they are published now, and
            # the whole agent is kept as it is, while the learner trains on during the evaluation.
            if agent.updates != self.published_updates:
                self._publish_new()
            self.judged = (agent.updates, [t.detach().clone() for t in agent.state_tensors()])
        seed = self.cfg.seed + self.cfg.eval.seed_offset
        self.eval_future = self.evaluator.evaluate.remote(self.weights_ref, seed, self.cfg.eval.video)
        self.eval_step = self.core.env_step
        self.eval_updates = self.published_updates
        return True

    def _collect_eval(self, wait: bool) -> bool:
        """Logs the evaluation in flight once it is done; whether it was (and succeeded)."""
        if self.eval_future is None:
            return False
        ready, _ = ray.wait([self.eval_future], timeout=None if wait else 0)
        if not ready:
            return False
        future, self.eval_future = self.eval_future, None
        try:
            metrics, gif, size = ray.get(future)
        except ray.exceptions.RayError as exc:
            log.warning("evaluation failed (%s); restarting the evaluator", str(exc).splitlines()[0][:300])
            ray.kill(self.evaluator, no_restart=True)
            self.evaluator = self._make_evaluator()
            return False
        self.core.log_eval(metrics, self.eval_step, (gif, size))
        return True

    def _judge(self) -> None:
        """`learner.stop_at_success`: an evaluation that reaches the rate ends the run, and the
        agent goes back to the state it judged (the learner trained on while it ran), so the
        checkpoint and the final weights are the ones that reached it."""
        if not self.core.reached_target or self.judged is None:
            return
        updates, tensors = self.judged
        agent = self.core.agent
        with torch.no_grad():
            for live, kept in zip(agent.state_tensors(), tensors):
                live.copy_(kept)
        agent.updates = updates
        agent.guard.forget()
        self.reached = True
        log.info("the evaluation of env step %d reached learner.stop_at_success=%s: the run ends with its weights",
                 self.eval_step, self.cfg.learner.stop_at_success)

    def _log_perf(self) -> None:
        core, actors = self.core, self.actors
        lag = [self.version - v for v in self.actor_versions.values()]

        def total(key: str) -> float:
            return float(sum(r[key] for r in self.reports.values()))

        backend = aggregate(backend_spec(self.cfg), [e for r in self.reports.values() for e in r["envs"]])
        extra = {
            "actors/alive": actors.alive,
            "actors/target": actors.target,
            "actors/retired": actors.retired,
            "actors/held_for_learner": self.holds,
            "perf/updates_owed": self.owed,
            "actors/restarts": actors.restarts,
            "actors/downtime_s": actors.downtime_s,
            "actors/policy_lag": max(lag) if lag else 0.0,
            "actors/weight_fetches": total("weight_fetches"),
            "replay/dropped": total("transitions_dropped"),
            "replay/send_failures": total("send_failures"),
            "actors/nonfinite_dropped": total("nonfinite_dropped"),
            "actors/simulator_failures": total("simulator_failures"),
            "actors/inference_fraction": total("inference_seconds") / max(total("loop_seconds"), 1e-9),
            **backend,
        }
        perf = core.log_perf(extra, self.actor_steps)
        self.actor_steps = dict.fromkeys(self.actor_steps, 0)
        status = (
            f"step {core.env_step}/{self.cfg.learner.max_timesteps} | {perf['perf/updates_per_s']:.1f} upd/s | "
            f"{perf['perf/env_steps_per_s']:.0f} steps/s | return {core.logger.latest.get('train/episode_reward', math.nan):.1f} | "
            f"actors {actors.alive}/{actors.target} | {core.progress()}"
        )
        if self.cfg.logging.quiet or not sys.stdout.isatty():
            log.info(status)
        else:
            sys.stdout.write("\r" + status.ljust(120))
            sys.stdout.flush()

    def _checkpoint(self) -> None:
        self.core.checkpoint({"weights_version": self.version})

    def _finish(self) -> None:
        """The end of the budget or a Ctrl-C: a last evaluation (unless interrupted) and a checkpoint.
        At `learner.stop_at_success` the agent is the one the evaluation that reached it judged."""
        self.core.replay.poll()
        if self.core.env_step != self.core.window_start_step:  # not logged a moment ago
            self._log_perf()
        self.actors.shutdown()
        # What Redis acknowledged before the actors stopped enters the ring, and the run's last point.
        while self.core.replay.poll():
            pass
        self.core.logger.log(self.core.replay.metrics(), self.core.env_step)
        if not self.stop_requested and self.judged is not None and self._collect_eval(wait=True):
            self._judge()  # the budget ended while an evaluation was in flight
        if not self.stop_requested and not self.reached:
            self._settle_debt()
            self._collect_eval(wait=True)
            # The run ends with an evaluation at its last env step of the weights the checkpoint
            # holds, even when one launched at that step judged the weights before the updates owed.
            if (self.core.env_step != self.eval_step or self.eval_updates != self.published_updates
                    or not self.core.last_eval):
                self._launch_eval()
                self._collect_eval(wait=True)
        if sys.stdout.isatty() and not self.cfg.logging.quiet:
            sys.stdout.write("\n")
        self._checkpoint()

    def _settle_debt(self) -> None:
        """At the end of the budget, the updates still owed for the steps reported, so the run ends
        with `learner.updates_per_step` x its steps like a serial one; the final evaluation and
        checkpoint get the weights they produce."""
        core = self.core
        if self.owed >= 1:
            log.info("budget reached: running the %d updates still owed", int(self.owed))
        while self.owed >= 1 and core.learner.ready(core.env_step):
            self.owed = self._train(self.owed)
        if core.agent.updates != self.published_updates:
            self._publish_new()

    def close(self) -> None:
        self.actors.shutdown()
        self.core.close()
        ray.shutdown()
