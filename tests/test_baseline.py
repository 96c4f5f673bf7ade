"""The route geometry shared by the CARLA backend, and the PID + pure-pursuit baseline on the
embedded env through the learner's evaluator."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from actors.baseline import INTEGRAL_LIMIT, PurePursuitPID
from actors.envs.route import Route
from common.config import load_config
from learner.evaluate import evaluate_baseline


def test_route_measures_signed_offset_heading_and_progress():
    route = Route(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]))
    s, lat, heading_error, look = route.measure(np.array([4.0, 1.0]), math.radians(10), spacing=2.0)
    assert s == pytest.approx(4.0) and lat == pytest.approx(1.0)  # left of the route is positive
    assert heading_error == pytest.approx(math.radians(10))
    assert look.shape == (25, 2) and look[0, 0] > 0 and np.abs(look).max() > 20, "look-ahead points are filled"
    s, lat, _, _ = route.measure(np.array([11.0, 5.0]), math.pi / 2, spacing=2.0)
    assert s == pytest.approx(15.0) and lat == pytest.approx(-1.0)  # past the corner, right of it
    assert np.allclose(route.point_at(np.array([25.0])), [[10.0, 15.0]]), "extrapolated past the end"
    with pytest.raises(ValueError, match="at least 2"):
        Route(np.array([[1.0, 1.0], [1.0, 1.0]]))


def test_route_does_not_jump_to_a_later_pass_nearby():
    theta = np.linspace(0, 4 * math.pi, 400)  # two laps of the same circle
    route = Route(np.stack([20 * np.cos(theta), 20 * np.sin(theta)], 1))
    for t in np.linspace(0.1, 6.0, 30):
        s, *_ = route.project(np.array([20 * math.cos(t), 20 * math.sin(t)]))
    assert s == pytest.approx(20 * 6.0, rel=0.01), "still on the first lap"


def test_pid_integrator_is_clamped_and_steering_points_at_the_route():
    pid = PurePursuitPID(target_speed=8.0, dt=0.1, max_steer_rad=math.pi / 4)
    for _ in range(1000):
        pid.throttle_brake(0.0)
    assert pid.integral == pytest.approx(INTEGRAL_LIMIT)
    left = np.stack([np.arange(1, 26) * 2.0, np.full(25, 3.0)], 1)  # route to the left
    assert pid.steer(5.0, left) < 0, "steer < 0 turns left"
    assert pid.steer(5.0, left * [1, -1]) > 0


@pytest.mark.parametrize("lookahead", ["metres", "per_point"])
def test_baseline_drives_the_embedded_route(lookahead):
    """Whatever the look-ahead's scaling, the baseline decodes the same points in metres."""
    cfg = load_config(overrides=["env.embedded.traffic=[0,0,0]", "env.route_length_m=120",
                                 f"env.lookahead_features={lookahead}"])
    metrics, _, _ = evaluate_baseline(cfg, episodes=2, seed=5)
    assert metrics["eval/success_rate"] == 1.0 and metrics["eval/collision_rate"] == 0.0
    assert metrics["eval/avg_lane_invasions"] == 0.0


def test_baseline_cli(tmp_path):
    """`python -m learner.evaluate --policy baseline`: the baseline through the evaluator's command line."""
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "learner.evaluate", "--policy", "baseline", "--episodes", "1", "--json", str(out),
         "--set", f"logging.logdir={tmp_path}", "--set", "env.route_length_m=60"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval/success_rate" in proc.stdout and "eval/mean_reward" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["metrics"]) >= {"eval/success_rate", "eval/collision_rate", "eval/avg_episode_length"}
    assert report["seed"] == 100_000 and len(report["episodes"]) == 1
    assert any(p.name.startswith("events") for p in next(tmp_path.glob("*_baseline_embedded_*")).iterdir())
    bad = subprocess.run([sys.executable, "-m", "learner.evaluate", "--policy", "baseline", "--set", "env.scenrio=1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Did you mean 'scenario'" in bad.stderr
    no_path = subprocess.run([sys.executable, "-m", "learner.evaluate"], capture_output=True, text=True, timeout=60)
    assert no_path.returncode == 2 and "needs a run or checkpoint path" in no_path.stderr
