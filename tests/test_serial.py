import ctypes
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import common.memory as memory
from common.metrics import read_scalars
from common.tags import describe
from learner.cli import main
from learner.evaluate import main as evaluate_main
from learner.run_dirs import latest_run

SMOKE = [
    "--mode", "serial", "--device", "cpu", "--seed", "3", "--num-eval-episodes", "1",
    "--set", "td3.batch_size=16", "--set", "td3.learning_starts=100", "--set", "replay.capacity=2000",
    "--set", "replay.min_size_to_sample=16", "--set", "td3.critic_warmup_updates=10",
    "--set", "env.max_episode_steps=60", "--set", "learner.updates_per_step=0.5",
    "--set", "logging.log_interval=10", "--set", "logging.log_seconds=1000",
]

SEED_TAGS = [
    "debug/cnn_features_l2_norm", "debug/cnn_feature_mean", "debug/cnn_feature_std", "debug/cnn_feature_min",
    "debug/cnn_feature_max", "train/critic_loss", "train/actor_loss", "debug/q1_mean", "debug/q2_mean",
    "debug/td_error_q1", "debug/td_error_q2",
    "gradients/critic_cnn_norm", "gradients/critic_mlp_norm", "gradients/actor_mlp_norm",
    "alerts/gradient_explosion_warning", "alerts/gradient_explosion_critical", "alerts/feature_explosion",
    "agent/cnn_lr", "agent/mlp_lr", "train/episode_reward", "train/episode_length", "train/collisions_per_episode",
    "train/lane_invasions_per_episode",
    *(f"rewards/{c}" for c in ("efficiency", "lane_keeping", "comfort", "safety", "progress")),
    "eval/mean_reward", "eval/success_rate", "eval/collision_rate", "eval/avg_episode_length", "eval/avg_lane_invasions",
    "perf/updates_per_s", "perf/env_steps_per_s",
    # the overview's tags
    "train/updates", "perf/updates_per_env_step", "perf/learner_step_ms", "perf/learner_busy_fraction",
    "debug/q_target_mean", "train/mean_speed", "train/route_progress_m",
    "train/route_progress_pct", "eval/mean_speed", "eval/route_progress_m", "eval/route_progress_pct",
    *(f"train/termination_{r}" for r in ("collision", "off_road", "lane_departure", "route_completed", "timeout")),
    *(f"eval/termination_{r}" for r in ("off_road", "lane_departure", "timeout")),
    "eval/baseline_mean_reward", "eval/baseline_success_rate", "eval/baseline_collision_rate",
    "eval/baseline_route_progress_pct", "eval/random_mean_reward", "debug/reference_feature_l2_warning",
    # the action-lock dashboard
    "debug/actor_pretanh_abs_mean", "debug/actor_pretanh_abs_max", "debug/dq_da_norm", "alerts/action_saturation",
    "train/pretanh_penalty",
    *(f"{k}_{d}" for k in ("debug/action_saturated", "debug/action_mean", "debug/action_std", "train/policy_action_mean",
                            "train/policy_action_std") for d in ("steer", "throttle")),
]


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def values(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return [(step, value) for _, step, value in read_scalars(run_dir)[tag]]


def test_serial_smoke_run_logs_the_seed_tags_and_checkpoints(tmp_path):
    assert main([*SMOKE, "--max-timesteps", "300", "--logdir", str(tmp_path)]) == 0
    run_dir = latest_run(tmp_path)
    logged = read_scalars(run_dir)
    missing = [t for t in SEED_TAGS if t not in logged]
    assert not missing, missing
    assert not [t for t in logged if describe(t) is None]  # every tag explains itself
    # no panel that always equals another: these two are eval/collision_rate and eval/success_rate
    assert not {"eval/termination_collision", "eval/termination_route_completed"} & logged.keys()
    acc = events(run_dir)
    assert any("config" in t for t in acc.Tags()["tensors"])  # the resolved config as text
    # env steps are the x-axis
    assert max(step for step, _ in values(run_dir, "train/critic_loss")) <= 300
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000000300"
    assert max(v for _, v in values(run_dir, "debug/cnn_features_l2_norm")) < 100
    assert {"debug/action_steer", "debug/action_throttle", "debug/q"} <= set(acc.Tags()["histograms"])
    # termination fractions over recent episodes sum to 1
    fractions = [values(run_dir, f"train/termination_{r}")[-1][1]
                 for r in ("collision", "off_road", "lane_departure", "route_completed", "timeout")]
    assert sum(fractions) == pytest.approx(1.0)
    # The checkpoint evaluates from the command line, on seeds of the caller's choosing.
    report, gif = tmp_path / "eval.json", tmp_path / "eval.gif"
    assert evaluate_main([str(run_dir), "--episodes", "2", "--seed", "500", "--json", str(report),
                          "--video", str(gif), "--video-episodes", "1"]) == 0
    result = json.loads(report.read_text())
    assert result["seed"] == 500 and len(result["episodes"]) == 2
    assert 0.0 <= result["metrics"]["eval/success_rate"] <= 1.0
    assert gif.read_bytes()[:6] == b"GIF89a"


def test_evaluate_names_what_is_wrong(tmp_path, capsys):
    assert evaluate_main([str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert evaluate_main([str(tmp_path), "--episodes", "0"]) == 2
    assert "--episodes=0" in capsys.readouterr().err
    assert evaluate_main([str(tmp_path), "--video", "x.gif", "--video-stride", "0"]) == 2
    assert "--video-stride=0" in capsys.readouterr().err


def test_resume_latest_continues_the_run(tmp_path):
    assert main([*SMOKE, "--max-timesteps", "200", "--checkpoint-freq", "200", "--logdir", str(tmp_path)]) == 0
    run_dir = latest_run(tmp_path)
    assert main(["--resume", "latest", "--max-timesteps", "300", "--logdir", str(tmp_path)]) == 0
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [run_dir]  # same run directory
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000000200", "step_000000300"]
    # 50 updates per 100 steps after learning starts, logged every 10: 5 logs before the resume and
    # 5 after it. A restart from step 0 would have logged 10 after it.
    steps = sorted(step for step, _ in values(run_dir, "train/critic_loss"))
    assert len(steps) == 10 and steps[5] > 200


def test_bad_flags_exit_with_a_message(tmp_path, capsys):
    assert main(["--set", "td3.gama=0.9", "--logdir", str(tmp_path)]) == 2
    assert "unknown config key 'td3.gama'" in capsys.readouterr().err
    assert main(["--resume", "latest", "--logdir", str(tmp_path)]) == 2
    assert "no run with a checkpoint" in capsys.readouterr().err
    assert main(["--set", "env.backend=carla", "--set", "carla.route_file=/no/route.txt", "--logdir", str(tmp_path)]) == 2
    assert "carla.route_file '/no/route.txt' does not exist" in capsys.readouterr().err
    # No CARLA server here: a clear error naming the command, and a non-zero exit.
    assert main(["--set", "env.backend=carla", "--mode", "serial", "--logdir", str(tmp_path)]) == 1
    command = "/workspace/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping CarlaUE4 -RenderOffScreen -nosound"
    assert f"carla.server_command '{command}' cannot be started" in capsys.readouterr().err


def test_serial_run_through_the_redis_replay_service_resumes_from_redis(tmp_path):
    args = [*SMOKE, "--set", "replay.via_redis=true", "--logdir", str(tmp_path)]
    assert main([*args, "--max-timesteps", "200"]) == 0
    run_dir = latest_run(tmp_path)
    ckpt = run_dir / "checkpoints" / "step_000000200"
    assert not (ckpt / "replay.npz").exists()  # the replay lives in Redis, persisted by its AOF
    assert (run_dir / "redis" / "appendonly.aof").exists()
    assert main(["--resume", "latest", "--max-timesteps", "260", "--logdir", str(tmp_path)]) == 0
    sizes = [v for _, v in values(run_dir, "replay/size")]
    assert sizes[-1] == 260  # 200 read back from Redis at restart + 60 new


def test_gap_features_run_end_to_end(tmp_path):
    """env.gap_features widens the vector to 55 through the env, the chunks, the Redis replay, the
    networks, the checkpoint and its evaluation."""
    args = [*SMOKE, "--set", "replay.via_redis=true", "--set", "env.gap_features=true", "--logdir", str(tmp_path)]
    assert main([*args, "--max-timesteps", "200"]) == 0
    run_dir = latest_run(tmp_path)
    assert values(run_dir, "replay/size")[-1][1] == 200
    assert evaluate_main([str(run_dir), "--episodes", "1", "--seed", "500"]) == 0


def test_nonfinite_env_steps_are_dropped_not_learned(tmp_path, small_cfg):
    import numpy as np

    from learner.serial import SerialRun

    small_cfg.learner.max_timesteps = 200
    run = SerialRun(small_cfg, tmp_path / "run").init()
    step = run.env.step
    calls = {"n": 0}

    def poisoned(action):
        obs, reward, terminated, truncated, info = step(action)
        calls["n"] += 1
        if calls["n"] in (30, 31, 120):
            reward = float("nan") if calls["n"] != 31 else reward
            obs = {**obs, "vector": np.full_like(obs["vector"], np.inf)} if calls["n"] == 31 else obs
        return obs, reward, terminated, truncated, info

    run.env.step = poisoned
    run.run()
    ring = run.core.ring
    assert run.nonfinite == 3
    assert len(ring) == 200 - 3
    assert np.isfinite(ring.reward[: len(ring)]).all() and np.isfinite(ring.next_vector[: len(ring)]).all()


def test_a_crashed_redis_server_is_relaunched_from_its_aof(tmp_path, small_cfg):
    import time

    from learner.serial import SerialRun

    small_cfg.learner.max_timesteps = 400
    small_cfg.replay.via_redis = True
    run = SerialRun(small_cfg, tmp_path / "run").init()
    service = run.core.replay
    poll = service.poll
    state = {"killed_at": None, "stream_before": None}

    def poll_and_crash() -> int:
        if state["killed_at"] is None and run.core.env_step >= 200:
            time.sleep(1.2)  # appendfsync everysec: what Redis acknowledged a second ago is on disk
            state["stream_before"] = service.redis.xlen(small_cfg.replay.stream_key)
            service.server.kill()
            state["killed_at"] = run.core.env_step
        return poll()

    service.poll = poll_and_crash
    run.run()
    assert state["killed_at"] is not None and run.core.env_step == 400
    assert service.redis_restarts == 1
    from replay_server.client import connect
    from replay_server.server import RedisServer

    with RedisServer(tmp_path / "run" / "redis") as again:  # everything it acknowledged is still there
        assert connect(again.url).xlen(small_cfg.replay.stream_key) >= state["stream_before"]


@pytest.mark.skipif(memory._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_free_heap_hands_the_heaps_free_pages_back():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024  # below glibc's mmap threshold: from the heap, as an update's smaller arrays are
    blocks = [libc.malloc(size) for _ in range(1600)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    pin = blocks.pop()  # keeps the freed blocks below the heap's top, where free() alone never returns them
    for block in blocks:
        libc.free(block)
    try:
        assert memory.release_free_heap() > 50
    finally:
        libc.free(pin)
