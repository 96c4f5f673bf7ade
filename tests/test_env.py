import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from actors.baseline import baseline_for
from actors.envs import make_env
from actors.envs.carla_server import CarlaUnavailable
from common.config import ConfigError, load_config
from common.driving import (
    DrivingState,
    decode_lookahead,
    emergency_brake,
    headway_shortfall,
    reward_components,
    stopped_time,
    termination,
    vector_features,
    weighted_components,
)
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def env():
    e = make_env(load_config(overrides=["env.embedded.traffic=[0,0,0]"]))
    yield e
    e.close()


def lane_structure(frame: np.ndarray) -> bool:
    """A top-down road picture: grey asphalt with bright lane markings, not a constant image."""
    bright = (frame > 200).mean()
    grey = ((frame > 60) & (frame < 140)).mean()
    return frame.std() > 10 and 0.002 < bright < 0.3 and grey > 0.3


def test_observation_contract(env):
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (4, 84, 84) and obs["image"].dtype == np.uint8
    assert obs["vector"].shape == (53,) and obs["vector"].dtype == np.float32
    assert all((obs["image"][i] == obs["image"][0]).all() for i in range(4))  # reset pads with the first frame
    assert lane_structure(obs["image"][-1])
    obs2, reward, terminated, truncated, info = env.step(np.array([0.0, 0.2], np.float32))
    np.testing.assert_array_equal(obs2["image"][:3], obs["image"][1:])  # the stack shifts by one frame
    assert set(info["rewards"]) == {"efficiency", "lane_keeping", "comfort", "safety", "progress"}
    assert reward == pytest.approx(sum(info["rewards"].values()))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0.0]))


def test_frames_are_real_pictures_even_with_the_dummy_sdl_driver():
    code = (
        "import numpy as np, json; from common.config import load_config; from actors.envs import make_env;"
        "e = make_env(load_config()); o, _ = e.reset(seed=1);"
        "f = o['image'][-1]; print(json.dumps([float(f.std()), float((f > 200).mean()), int(np.unique(f).size)]))"
    )
    env_vars = dict(os.environ, SDL_VIDEODRIVER="dummy")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_vars, capture_output=True, text=True, check=True)
    std, bright, unique = json.loads(out.stdout.strip().splitlines()[-1])
    assert std > 10 and bright > 0.002 and unique >= 3


def _frame_near_the_lead_car(override: str, steps: int, throttle: float) -> np.ndarray:
    """The newest camera frame of held-out episode 100001 (its lead car starts ~13 m ahead in the
    ego's lane) after `steps` straight steps at `throttle`, with one config `override`."""
    e = make_env(load_config(overrides=[override]))
    try:
        obs, _ = e.reset(seed=100001)
        for _ in range(steps):
            obs, *_ = e.step(np.array([0.0, throttle], np.float32))
        return obs["image"][-1]
    finally:
        e.close()


def test_the_camera_shows_traffic_in_contrast():
    """Other vehicles are black and the ego light gray on the contrast camera; highway-env's own
    drawing leaves the lead car within a few dozen gray levels of the road."""
    from actors.envs.render import EGO_SHADE, OTHER_SHADE

    # full throttle until the lead car is a few metres ahead
    contrast = _frame_near_the_lead_car("env.embedded.camera_vehicles=contrast", 15, 1.0)
    ego = np.abs(contrast[34:50, 34:50].astype(int) - EGO_SHADE) <= 1  # the gray conversion rounds down
    assert ego.sum() >= 15  # the ego's footprint, at the centre
    assert (contrast == OTHER_SHADE).sum() >= 15  # the lead car's
    highway = _frame_near_the_lead_car("env.embedded.camera_vehicles=highway", 15, 1.0)
    assert (highway < 40).sum() < (contrast == OTHER_SHADE).sum()


def test_the_heading_up_camera_shows_the_lead_car_straight_ahead():
    """The route starts heading east (+x): north up, the lead car is right of the ego; turned with
    the ego, it is above it, in the ego's columns."""
    from actors.envs.render import EGO_SHADE, OTHER_SHADE

    def centres(heading_up: bool) -> tuple[np.ndarray, np.ndarray]:
        frame = _frame_near_the_lead_car(f"env.embedded.camera_heading_up={str(heading_up).lower()}", 1, 0.0).astype(int)
        assert frame.shape == (84, 84)
        ego = np.argwhere(np.abs(frame - EGO_SHADE) <= 1).mean(axis=0)
        lead = np.argwhere(frame == OTHER_SHADE).mean(axis=0)
        return ego, lead  # (row, col)

    ego, lead = centres(False)
    assert lead[1] - ego[1] > 5 and abs(lead[0] - ego[0]) < 3
    ego, lead = centres(True)
    assert ego[0] - lead[0] > 5 and abs(lead[1] - ego[1]) < 3
    assert abs(ego[0] - 42) < 4 and abs(ego[1] - 42) < 4  # the ego stays at the centre


def test_the_camera_ahead_puts_the_ego_below_the_centre():
    """camera_ahead_m moves the view's centre ahead along the ego's heading: heading up, the ego
    sits that many metres (1.75 px each) below the middle row, in the middle column."""
    from actors.envs.render import EGO_SHADE

    frame = _frame_near_the_lead_car("env.embedded.camera_ahead_m=12", 1, 0.0).astype(int)
    ego = np.argwhere(np.abs(frame - EGO_SHADE) <= 1).mean(axis=0)
    assert abs(ego[0] - (42 + 12 * 1.75)) < 3 and abs(ego[1] - 42) < 3


def test_route_features_stay_valid_along_the_whole_route(env):
    """The old system's waypoint-index bug zeroed the route features after a while."""
    obs, _ = env.reset(seed=3)
    spacing = env.cfg.lookahead_spacing_m
    done, steps, info = False, 0, {}
    driver = baseline_for(load_config(), env.backend.dt)
    while not done:
        look = decode_lookahead(obs["vector"], env.cfg)
        gaps = np.linalg.norm(np.diff(look, axis=0), axis=1)
        # Spaced along the route; highway-env's hand-made racetrack segments meet with gaps of
        # up to 2.6 m (or overlap a little), which shows where a segment ends.
        assert np.all((gaps > 0.1) & (gaps < spacing + 3.0)), gaps
        assert np.median(gaps) == pytest.approx(spacing, abs=0.01)
        assert np.linalg.norm(look[0]) < spacing + 3.0  # starts at the vehicle ...
        assert gaps.sum() > 0.9 * 24 * spacing  # ... and reaches ahead, never zeroed
        obs, _, terminated, truncated, info = env.step(driver(obs))
        done = terminated or truncated
        steps += 1
    assert info["termination"] == "route_completed", info
    assert info["progress"] >= env.cfg.route_length_m


def test_lateral_offset_is_signed_left_positive(env):
    obs, _ = env.reset(seed=3)
    for _ in range(8):  # steer left (negative steer) for a while
        obs, *_ = env.step(np.array([-0.3, 0.0], np.float32))
    assert obs["vector"][1] > 0.05 and obs["vector"][2] > 0.0
    obs, _ = env.reset(seed=3)
    for _ in range(8):
        obs, *_ = env.step(np.array([0.3, 0.0], np.float32))
    assert obs["vector"][1] < -0.05 and obs["vector"][2] < 0.0


def test_braking_stops_the_car_and_never_reverses_it(env):
    """CARLA's brake stops a car (reverse gear off); highway-env's kinematics alone let a held
    brake drive the ego backwards down to -40 m/s."""
    env.reset(seed=0)
    progress = []
    for _ in range(45):  # 4.5 s of full brake from highway-env's starting speed, < 3 s stopped
        _, _, terminated, _, info = env.step(np.array([0.0, -1.0], np.float32))
        assert not terminated and info["speed"] >= 0.0
        progress.append(info["progress"])
    assert info["speed"] == 0.0
    assert np.all(np.diff(progress) >= 0.0) and progress[-1] == progress[-20]  # stopped and held
    _, _, _, _, info = env.step(np.array([0.0, 1.0], np.float32))
    assert info["speed"] > 0.0  # and drives off again


@pytest.mark.parametrize("stuck_after_s, stuck_penalty", [(3.0, 0.0), (0.0, 0.0), (3.0, 10.0)])
def test_a_car_stopped_on_a_clear_road_ends_the_episode_as_stuck(stuck_after_s, stuck_penalty):
    """Terminal, not a timeout: a standstill's value is the 0 it earns, not the critic's guess,
    less `env.reward.stuck_penalty` on the last step."""
    e = make_env(load_config(overrides=["env.embedded.traffic=[0,0,0]", f"env.stuck_after_s={stuck_after_s}",
                                        f"env.reward.stuck_penalty={stuck_penalty}"]))
    try:
        e.reset(seed=0)
        stopped_at = None
        for step in range(1, 101):
            _, reward, terminated, truncated, info = e.step(np.array([0.0, -1.0], np.float32))
            if stopped_at is None and info["speed"] < 0.5:
                stopped_at = step
            if terminated:
                break
        assert stopped_at is not None and not truncated
        if stuck_after_s:
            assert info["termination"] == "stuck" and step - stopped_at == 29  # the 30th stopped step
            assert info["obstacle_distance"] == math.inf and reward == pytest.approx(-stuck_penalty, abs=1e-6)
        else:
            assert not terminated and info["termination"] is None
    finally:
        e.close()


def test_a_stop_behind_an_obstacle_is_a_wait_not_stuck():
    cfg = load_config(overrides=["env.stuck_after_s=3"]).env
    clear, blocked = _state(speed=0.0), _state(speed=0.0, obstacle_distance=12.0)
    assert stopped_time(clear, 2.9, 0.1, cfg) == pytest.approx(3.0)
    assert stopped_time(blocked, 2.9, 0.1, cfg) == 0.0
    assert stopped_time(_state(speed=1.0), 2.9, 0.1, cfg) == 0.0
    assert termination(clear, 10, cfg, stopped_s=3.0) == (True, False, "stuck")
    assert termination(clear, 10, cfg, stopped_s=2.9) == (False, False, None)


@pytest.mark.parametrize("reference, lane_offset, pays", [
    ("route", 0.0, 0.0),  # in the other lane, centred in it: nothing, whatever the car does there
    ("lane", 0.0, 1.0),
    ("lane", 1.25, 0.5),
    ("lane", None, 0.0),  # off every lane that goes the route's way: the route's offset stands in
])
def test_lane_keeping_measures_from_the_routes_centre_or_the_cars_lane(reference, lane_offset, pays):
    cfg = load_config(overrides=[f"env.reward.lane_keeping_reference={reference}"]).env
    state = _state(lateral_offset=5.0, lane_offset=lane_offset)
    assert reward_components(state, _state(), 0.1, None, cfg)["lane_keeping"] == pytest.approx(pays)


def test_the_headway_penalty_charges_following_closer_than_the_time_gap():
    r = load_config(overrides=["env.reward.headway_penalty=3", "env.reward.headway_s=1.5"]).env.reward
    assert headway_shortfall(_state(speed=8.0), r) == 0.0  # nothing ahead
    assert headway_shortfall(_state(speed=8.0, obstacle_distance=12.0), r) == 0.0  # 1.5 s
    assert headway_shortfall(_state(speed=8.0, obstacle_distance=6.0), r) == pytest.approx(0.5)
    assert headway_shortfall(_state(speed=8.0, obstacle_distance=0.0), r) == 1.0
    assert headway_shortfall(_state(speed=0.0, obstacle_distance=0.5), r) == 0.0  # a wait in a queue
    cfg = load_config(overrides=["env.reward.headway_penalty=3"]).env
    close, clear = _state(obstacle_distance=6.0), _state()
    assert reward_components(close, clear, 0.1, None, cfg)["safety"] == pytest.approx(-1.5)
    assert reward_components(close, clear, 0.1, None, load_config().env)["safety"] == 0.0  # off by default


def test_emergency_braking_keeps_the_gap_it_needs_to_stop_behind_the_car_ahead():
    """RSS's safe distance with a 2 m margin, 5 m/s^2 both ways and a 0.1 s step: at 8 m/s behind a
    car as fast, 0.825 m driven in the step + (8.5^2 - 8^2) / 10 + 2 = 3.65 m."""
    cfg = load_config(overrides=["env.aeb_gap_m=2"]).env
    follow = _state(speed=8.0, obstacle_distance=6.0)
    assert not emergency_brake(follow, follow, 0.1, cfg)
    close = _state(speed=8.0, obstacle_distance=3.6)
    assert emergency_brake(close, close, 0.1, cfg)
    assert emergency_brake(follow, _state(speed=8.0, obstacle_distance=6.5), 0.1, cfg)  # closing at 5 m/s
    assert not emergency_brake(_state(speed=8.0), follow, 0.1, cfg)  # nothing ahead
    # Just in range (a cut-in, the first step): its speed is unknown, so it counts as stopped.
    cut_in = _state(speed=8.0, obstacle_distance=10.0)
    assert emergency_brake(cut_in, _state(speed=8.0), 0.1, cfg) and emergency_brake(cut_in, None, 0.1, cfg)
    assert not emergency_brake(_state(speed=8.0, obstacle_distance=10.1), None, 0.1, cfg)
    # Creeping behind a stopped car at 0.5 m/s: (0.5 + 1.0) / 2 * 0.1 + 1.0^2 / 10 + 2 = 2.175 m.
    assert emergency_brake(_state(speed=0.5, obstacle_distance=2.1), _state(speed=0.5, obstacle_distance=2.15), 0.1, cfg)
    assert not emergency_brake(_state(speed=0.5, obstacle_distance=2.2), _state(speed=0.5, obstacle_distance=2.25), 0.1, cfg)
    # Stopped: the policy may move off (pull out round it), however near the car ahead.
    assert not emergency_brake(_state(speed=0.0, obstacle_distance=1.0), _state(speed=0.0, obstacle_distance=1.0), 0.1, cfg)
    assert not emergency_brake(close, close, 0.1, load_config().env)  # off by default
    charged = load_config(overrides=["env.aeb_gap_m=2", "env.reward.aeb_penalty=5"]).env
    assert reward_components(follow, follow, 0.1, None, charged, braked=True)["safety"] == -5.0
    assert reward_components(follow, follow, 0.1, None, cfg, braked=True)["safety"] == 0.0  # no charge by default


def test_brake_reverses_keeps_highway_envs_own_kinematics():
    """The switch that reproduces the results measured before the fix."""
    e = make_env(load_config(overrides=["env.embedded.traffic=[0,0,0]", "env.embedded.brake_reverses=true"]))
    try:
        e.reset(seed=0)
        progress = []
        for _ in range(40):  # from highway-env's 10 m/s start: 2 s to a stop, then backwards
            _, _, _, _, info = e.step(np.array([0.0, -1.0], np.float32))
            progress.append(info["progress"])
        assert info["speed"] < -5.0 and progress[-1] < progress[-10]
    finally:
        e.close()


def _state(**kw) -> DrivingState:
    base = dict(speed=8.0, lateral_offset=0.0, heading_error=0.0, acceleration=0.0, collision=False,
                off_road=False, lane_invasion=False, progress=0.0)
    return DrivingState(**(base | kw))


def test_vector_features_normalisation():
    look = np.stack([np.arange(1, 26) * 2.0, np.full(25, 1.0)], axis=1).astype(np.float32)
    state = _state(speed=15.0, lateral_offset=-1.75, heading_error=math.pi / 2, lookahead=look)
    cfg = load_config(overrides=["env.lookahead_features=metres"]).env
    v = vector_features(state, cfg)
    np.testing.assert_allclose(v[:3], [0.5, -0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(v[3:5], [2 / 50, 1 / 50], rtol=1e-6)
    np.testing.assert_allclose(decode_lookahead(v, cfg), look, rtol=1e-6)
    per_point = load_config(overrides=["env.lookahead_features=per_point"]).env
    v = vector_features(state, per_point)
    np.testing.assert_allclose(v[:3], [0.5, -0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(v[3:5], [1.0, 1 / 2], rtol=1e-6)  # the 2 m point, by 2 m
    np.testing.assert_allclose(v[-2:], [1.0, 1 / 50], rtol=1e-6)  # the 50 m point, by 50 m
    np.testing.assert_allclose(decode_lookahead(v, per_point), look, rtol=1e-6)


def test_lane_invasion_is_penalised_once():
    cfg = load_config().env
    prev = _state()
    clean = reward_components(_state(progress=1.0), prev, 0.1, None, cfg)
    invaded = reward_components(_state(progress=1.0, lane_invasion=True), prev, 0.1, None, cfg)
    diff = {k: invaded[k] - clean[k] for k in clean}
    assert diff == {"efficiency": 0, "lane_keeping": 0, "comfort": 0, "safety": -cfg.reward.lane_invasion_penalty, "progress": 0}


def _step_reward(speed: float, cfg) -> float:
    """The step reward of driving one 0.1 s step at `speed` on the route centre."""
    prev = _state(speed=speed, progress=100.0)
    now = _state(speed=speed, progress=100.0 + speed * 0.1)
    return sum(weighted_components(reward_components(now, prev, 0.1, None, cfg), cfg.reward).values())


def test_the_progress_cap_makes_the_target_speed_pay_most():
    capped = load_config().env
    plain = load_config(overrides=["env.reward.progress_speed_cap=false"]).env
    speeds = [4.0, 8.0, 12.0, 19.0]
    assert [round(_step_reward(v, capped), 2) for v in speeds] == [3.2, 6.4, 5.4, 3.65]
    assert [round(_step_reward(v, plain), 2) for v in speeds] == [3.2, 6.4, 6.6, 6.95]  # faster always pays more


def test_speed_gated_lane_keeping_pays_nothing_standing_still():
    gated = load_config(overrides=["env.reward.lane_keeping_speed_gate=true"]).env
    plain = load_config(overrides=["env.reward.lane_keeping_speed_gate=false"]).env
    centred = {"lateral_offset": 0.0, "heading_error": 0.0}

    def lane_keeping(cfg, speed):
        return reward_components(_state(speed=speed, **centred), _state(), 0.1, None, cfg)["lane_keeping"]

    assert lane_keeping(plain, 0.0) == lane_keeping(plain, 8.0) == 1.0
    assert lane_keeping(gated, 0.0) == 0.0
    assert lane_keeping(gated, 2.0) == pytest.approx(0.25)
    assert lane_keeping(gated, 8.0) == lane_keeping(gated, 20.0) == 1.0


def test_jerk_uses_the_previous_states_acceleration():
    cfg = load_config().env
    comfort = reward_components(_state(acceleration=1.0), _state(acceleration=0.5), 0.1, None, cfg)["comfort"]
    assert comfort == pytest.approx(-min(abs(1.0 - 0.5) / 0.1 / cfg.reward.jerk_scale, 1.0))
    assert reward_components(_state(acceleration=2.0), _state(acceleration=2.0), 0.1, None, cfg)["comfort"] == 0.0


def test_reward_weights_default_to_2_2_1_1_3():
    r = load_config().env.reward
    ones = dict.fromkeys(["efficiency", "lane_keeping", "comfort", "safety", "progress"], 1.0)
    assert weighted_components(ones, r) == {"efficiency": 2, "lane_keeping": 2, "comfort": 1, "safety": 1, "progress": 3}


@pytest.mark.parametrize(
    "kw, step, expected",
    [
        (dict(collision=True, off_road=True), 1, (True, False, "collision")),
        (dict(off_road=True), 1, (True, False, "off_road")),
        (dict(lateral_offset=-5.0), 1, (False, False, None)),  # the next lane: with lane changes, the route is the road
        (dict(progress=300.0), 1, (True, False, "route_completed")),
        (dict(), 1000, (False, True, "timeout")),
        (dict(lateral_offset=2.4), 999, (False, False, None)),
    ],
)
def test_termination_reasons(kw, step, expected):
    assert termination(_state(**kw), step, load_config(overrides=["env.lane_change=true"]).env) == expected


def test_leaving_the_routes_lane_ends_the_episode_only_without_lane_changes():
    cfg = load_config(overrides=["env.lane_change=false"]).env
    assert termination(_state(lateral_offset=-2.6), 1, cfg) == (True, False, "lane_departure")


def test_route_completion_truncates_when_the_route_end_bootstraps():
    cfg = load_config(overrides=["env.route_end_bootstraps=true"]).env
    assert termination(_state(progress=300.0), 1, cfg) == (False, True, "route_completed")
    # Failures stay terminal.
    assert termination(_state(progress=300.0, collision=True), 1, cfg) == (True, False, "collision")


def test_traffic_scenarios_add_vehicles():
    counts = []
    for scenario in (0, 2):
        e = make_env(load_config(overrides=[f"env.scenario={scenario}"]))
        e.reset(seed=0)
        counts.append(len(e.backend._env.road.vehicles))
        e.close()
    assert counts[1] > counts[0] >= 1


def test_carla_backend_without_a_server_is_a_clear_error(tmp_path):
    cfg = load_config(overrides=["env.backend=carla", f"carla.log_dir={tmp_path}"])
    binary = "/workspace/CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping"
    with pytest.raises(CarlaUnavailable, match=f"carla.server_command '{binary} CarlaUE4 -RenderOffScreen"):
        make_env(cfg)


@pytest.mark.parametrize("config", ["default.yaml", "carla.yaml", "seeds.yaml"])
def test_shipped_configs_leave_time_to_complete_the_route(config):
    from actors.envs import step_seconds
    from common.driving import ROUTE_TIME_MARGIN, route_time_margin

    cfg = load_config(ROOT / "deploy" / "configs" / config)
    assert route_time_margin(cfg.env, step_seconds(cfg)) >= ROUTE_TIME_MARGIN


def test_an_episode_too_short_for_its_route_is_named_at_start(caplog):
    from actors.envs import check_backend, step_seconds
    from common.driving import route_time_margin

    # The old carla.yaml: 1,000 steps of 0.05 s = 50 s for a 500 m route at 8 m/s = 62.5 s.
    cfg = load_config(overrides=["env.backend=carla", "env.max_episode_steps=1000", "env.route_length_m=500"])
    assert step_seconds(cfg) == pytest.approx(0.05)
    assert route_time_margin(cfg.env, step_seconds(cfg)) == pytest.approx(0.8)
    check_backend(load_config(overrides=["env.max_episode_steps=300", "env.route_length_m=300"]))  # 30 s for 37.5 s
    assert "route completion is out of reach" in caplog.text and "env.max_episode_steps=300" in caplog.text
    caplog.clear()
    check_backend(load_config())
    assert "out of reach" not in caplog.text


@pytest.mark.parametrize("start", ["anywhere", "anywhere_with_lead"])
def test_random_starts_spread_training_over_the_track_and_leave_evaluation_alone(start):
    cfg = load_config(overrides=[f"env.embedded.training_start={start}", "env.embedded.traffic=[8,8,16]"])
    train, evaluation = make_env(cfg, training=True), make_env(cfg)
    try:
        segments = set()
        for seed in range(12):
            _, info = train.reset(seed=seed)
            backend = train.backend
            segments.add(backend._route[:2])
            ego, *others = backend._env.road.vehicles
            assert info["progress"] == 0.0 and ego.lane_index == backend._route
            assert abs(ego.lane.local_coordinates(ego.position)[1]) < 1e-6  # on the lane centre
            if start == "anywhere_with_lead":  # the lead car on the next segment of the ego's lane
                lead, *others = others
                assert lead.lane_index == lead.target_lane_index == backend._next_on_route(backend._route)
            assert all(np.linalg.norm(v.position - ego.position) >= 20.0 for v in others)
            evaluation.reset(seed=seed)
            assert evaluation.backend._route[:2] == ("a", "b")  # the evaluation route is always the same
        assert len(segments) >= 5
        # The route from a random start is a whole route: the baseline completes it.
        obs, _ = train.reset(seed=7)
        policy, done, info = baseline_for(cfg, train.backend.dt), False, {}
        while not done:
            obs, _, terminated, truncated, info = train.step(policy(obs))
            done = terminated or truncated
        assert info["termination"] in ("route_completed", "collision")
    finally:
        train.close()
        evaluation.close()


def test_a_start_fraction_mixes_random_starts_with_the_fixed_one():
    cfg = load_config(overrides=["env.embedded.training_start=anywhere", "env.embedded.training_start_fraction=0.5"])
    train = make_env(cfg, training=True)
    try:
        starts = []
        for seed in range(40):
            train.reset(seed=seed)
            starts.append(train.backend._route[:2] == ("a", "b"))
        again = []
        for seed in range(40):
            train.reset(seed=seed)
            again.append(train.backend._route[:2] == ("a", "b"))
    finally:
        train.close()
    assert again == starts  # drawn from the episode's seed
    assert 10 <= sum(starts) <= 30  # about half fixed (a random start can land on the first segment too)
    with pytest.raises(ConfigError, match="training_start_fraction"):
        load_config(overrides=["env.embedded.training_start_fraction=1.5"])


def test_a_collision_is_named_by_the_nearest_vehicle_in_route_coordinates():
    """rear_end: ahead in the ego's lane; from_behind: behind in it; side: half a lane or more
    across; other: no vehicle within reach (CARLA's walls and poles)."""
    from common.driving import Surroundings, collision_kind

    def around(*rows):
        return Surroundings(np.array([0.0, 5.0]), 5.0, np.array(rows, dtype=np.float64).reshape(-1, 4))

    assert collision_kind(0.0, around((5.1, 0.3, 0.0, 0.0), (-30.0, 0.0, 9.0, 0.0))) == "rear_end"
    assert collision_kind(0.0, around((-5.0, -0.5, 9.0, 0.0))) == "from_behind"
    assert collision_kind(0.0, around((1.0, 3.0, 4.0, -1.0))) == "side"
    assert collision_kind(4.0, around((1.0, 3.0, 4.0, -1.0))) == "rear_end"  # the ego changed lanes into it
    assert collision_kind(0.0, around((25.0, 0.0, 0.0, 0.0))) == "other"
    assert collision_kind(0.0, around()) == "other"
