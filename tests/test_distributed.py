"""The distributed runtime on a real local Ray cluster (and a two-node one)."""

import signal
import time

import pytest
import ray
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import load_config
from common.metrics import read_scalars
from common.tags import describe
from learner.distributed import DistributedRun
from learner.run_dirs import latest_run

FAST = [
    "td3.batch_size=16", "td3.learning_starts=100", "replay.capacity=5000", "replay.min_size_to_sample=16",
    "replay.chunk_steps=16", "env.max_episode_steps=50", "eval.num_episodes=1", "eval.freq=200",
    "learner.device=cpu", "learner.updates_per_step=0.25", "learner.ray_dashboard=false",
    "learner.weight_sync_interval=5", "logging.log_interval=5", "logging.quiet=true",
    "actors.steps_per_report=50", "actors.weight_sync_steps=10", "actors.num_cpus=0.25",
    "actors.restart_backoff_s=0.2",
]


def scalars(run_dir, tag):
    logged = read_scalars(run_dir)
    return logged, [(step, value) for _, step, value in logged.get(tag, [])]


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_two_actors_feed_the_learner_and_receive_weights(tmp_path):
    cfg = load_config(overrides=[*FAST, "actors.num_actors=2", "learner.max_timesteps=400",
                                 "learner.updates_per_step=1", "learner.max_update_debt=5"])
    run = DistributedRun(cfg, tmp_path / "run").init()
    ray.get([h.pid.remote() for h in run.actors.handles.values()])  # both started, so neither can take the whole budget
    launch, core, handed_out_in_debt = run.actors.launch, run.core, []

    def checked_launch(index, *args):
        owed = (core.env_step - 100) - core.agent.updates  # at least: one update per step past learning_starts
        if owed > 5 and core.learner.ready(core.env_step):
            handed_out_in_debt.append((core.env_step, core.agent.updates))
        launch(index, *args)

    run.actors.launch = checked_launch
    final = run.run()
    assert final["eval/avg_episode_length"] > 0
    assert not handed_out_in_debt, "actors got new work while the learner owed over learner.max_update_debt"
    # Actors wait while the learner owes over 5 updates, and the run pays what it still owes at
    # the end: one update for each of the >= 300 steps reported after learning_starts.
    assert run.holds > 0
    assert run.core.agent.updates >= 400 - 100
    assert run.owed < 1
    # The run's last evaluation judged the weights its checkpoint holds, after the owed updates.
    assert run.eval_updates == run.published_updates == run.core.agent.updates
    ring = run.core.ring
    # transitions from both actors reached the learner
    assert {k[0] for k in ring._episodes} == {0, 1}
    logged, lag = scalars(tmp_path / "run", "actors/policy_lag")
    _, fetches = scalars(tmp_path / "run", "actors/weight_fetches")
    assert fetches and fetches[-1][1] >= 2  # weight versions reached the actors
    # Past learning_starts the actors run the policy, so part of their loop is its forward.
    _, inference = scalars(tmp_path / "run", "actors/inference_fraction")
    assert 0.0 < inference[-1][1] < 1.0
    for tag in ("eval/mean_reward", "eval/success_rate", "eval/collision_rate", "eval/avg_lane_invasions",
                "eval/avg_episode_length", "perf/env_steps_per_s", "perf/updates_per_s", "replay/size",
                "replay/dropped", "actors/alive", "actors/restarts", "perf/weight_broadcast_ms", "perf/learner_rss_mb",
                "perf/learner_heap_released_mb", "perf/env_steps_per_s_actor0", "train/critic_loss", "train/episode_reward",
                "actors/target", "eval/baseline_success_rate", "train/updates", "perf/learner_busy_fraction",
                "perf/learner_step_ms"):
        assert tag in logged, tag
    assert not [t for t in logged if describe(t) is None]
    # The per-actor rates are taken over the total's window, so they add up to it.
    total = dict(scalars(tmp_path / "run", "perf/env_steps_per_s")[1])
    per_actor = [dict(scalars(tmp_path / "run", f"perf/env_steps_per_s_actor{i}")[1]) for i in range(2)]
    for step, value in total.items():
        assert sum(a.get(step, 0.0) for a in per_actor) == pytest.approx(value, rel=1e-6)
    images = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    images.Reload()
    assert "eval/video" in images.Tags()["images"]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_actors_are_placed_on_the_node_with_the_simulator_resource(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    sim_node = cluster.add_node(num_cpus=2, resources={"sim": 2})
    try:
        cfg = load_config(overrides=[*FAST, "actors.num_actors=2", "learner.max_timesteps=200", "eval.freq=0",
                                     f"learner.ray_address={cluster.address}", "actors.resources={sim: 1}",
                                     "actors.envs_per_actor=2"])
        run = DistributedRun(cfg, tmp_path / "run").init()
        nodes = {ray.get(h.node_id.remote()) for h in run.actors.handles.values()}
        assert nodes == {sim_node.node_id}
        run.run()
        assert run.core.env_step >= 200
        # Two envs per actor: four chunk streams, one per env slot, reached the learner.
        assert {k[0] for k in run.core.ring._episodes} == {0, 1, 2, 3}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_elastic_actors_follow_nodes_that_join_and_leave(tmp_path):
    """Two-node start with room for one actor (the evaluator takes the other slot); a node joins
    mid-run and gets an actor whose transitions reach the learner; it leaves and its actor is
    retired, not counted as a death; the run goes on to the end. Ray's cluster utilities need the
    main thread, which the run loop holds: the scenario advances from the loop's elastic check."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2, resources={"sim": 2})
    try:
        cfg = load_config(overrides=[*FAST, "learner.max_timesteps=1000000", "eval.freq=0",
                                     f"learner.ray_address={cluster.address}", "actors.resources={sim: 1}",
                                     "actors.elastic_resource=sim", "actors.elastic_check_s=0.5"])
        run = DistributedRun(cfg, tmp_path / "run").init()
        assert run.actors.target == 1
        seen: dict[str, object] = {}

        def until(condition, what: str, timeout_s: float = 240.0):
            deadline = time.monotonic() + timeout_s
            while not condition():
                if time.monotonic() > deadline:
                    raise TimeoutError(what)
                yield

        def scenario():
            # The node joins after the first perf point, which logs the starting target: a join
            # within the first 5 s would otherwise be the first value the dashboard sees.
            yield from until(lambda: run.core.env_step > 0 and perf_points, "first report and perf point")
            node = cluster.add_node(num_cpus=1, resources={"sim": 1})
            yield from until(lambda: 1 in run.reports, "the joined node's actor reported")
            seen["target_after_join"] = run.actors.target
            cluster.remove_node(node)
            yield from until(lambda: run.actors.target == 1, "the left node's actor retired")
            steps = run.core.env_step
            yield from until(lambda: run.core.env_step >= steps + 200, "training went on")
            seen["alive_at_the_end"] = run.actors.alive
            run.stop_requested = True
            while True:
                yield

        perf_points: list[int] = []
        log_perf = run._log_perf

        def log_perf_and_count() -> None:
            log_perf()
            perf_points.append(run.actors.target)

        run._log_perf = log_perf_and_count
        driver, rescale = scenario(), run._rescale

        def rescale_and_advance() -> None:
            rescale()
            next(driver)

        run._rescale = rescale_and_advance
        run.run()
        assert perf_points[0] == 1 and seen["target_after_join"] == 2
        assert run.actors.retired == 1 and seen["alive_at_the_end"] == 1
        assert {k[0] for k in run.core.ring._episodes} == {0, 1}  # the joined actor's transitions reached the learner
        _, targets = scalars(tmp_path / "run", "actors/target")
        assert [v for _, v in targets][0] == 1 and 2 in [v for _, v in targets]
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ctrl_c_stops_everything_and_leaves_a_resumable_checkpoint(tmp_path):
    import subprocess
    import sys

    import redis as redis_lib

    from tests.conftest import ROOT

    sets = [arg for o in FAST if o != "eval.freq=200" for arg in ("--set", o)]
    cmd = [sys.executable, "-m", "learner", "--max-timesteps", "100000", "--logdir", str(tmp_path),
           "--set", "eval.freq=0", *sets]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step " in line and "/100000" in line and not line.split("step ")[1].startswith("0/"):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    run_dir = latest_run(tmp_path)
    (ckpt,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    port = int(next(l for l in lines if "replay service: redis-server on" in l).split(":")[-1].split("/")[0])
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        redis_lib.Redis(port=port, socket_connect_timeout=0.5).ping()
    assert not [l for l in out.splitlines() if "Traceback" in l]
    stopped_at = int(ckpt.name.split("_")[1])
    # the run resumes from its checkpoint, with its replay read back from Redis's AOF
    resumed = subprocess.run([sys.executable, "-m", "learner", "--resume", "latest", "--logdir", str(tmp_path),
                              "--max-timesteps", str(stopped_at + 100)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt}" in resumed.stdout + resumed.stderr
    assert "transitions already in" in resumed.stdout + resumed.stderr
