"""The embedded scenario ladder: traffic placed from the seed and in reach, the road as the route."""

import numpy as np
import pytest

from actors.baseline import PurePursuitPID, baseline_for, shift_lookahead
from actors.envs import make_env
from actors.evaluator import run_episode
from common.config import ConfigError, load_config
from common.driving import LATERAL_NORM, SPEED_NORM, decode_lookahead


def _env(*overrides):
    return make_env(load_config(overrides=list(overrides)))


def _traffic(env):
    ego = env.backend._env.vehicle
    return [(v.lane_index, tuple(np.round(v.position, 6)), v.speed) for v in env.backend._env.road.vehicles if v is not ego]


@pytest.mark.parametrize("scenario", [1, 2])
def test_placement_is_reproducible_from_the_seed(scenario):
    env = _env(f"env.scenario={scenario}")
    try:
        env.reset(seed=4)
        first = _traffic(env)
        env.reset(seed=5)
        other = _traffic(env)
        env.reset(seed=4)
        assert _traffic(env) == first and other != first
        assert len(first) == env.cfg.embedded.traffic[scenario]
    finally:
        env.close()


def test_scenario_1_puts_a_blocker_in_the_egos_lane_and_traffic_in_the_other():
    env = _env("env.scenario=1")
    try:
        for seed in range(10):
            env.reset(seed=seed)
            su = env.backend.surroundings()
            v = su.vehicles
            own = v[(np.abs(v[:, 1]) < 1.0) & (v[:, 0] > 0)]
            other = v[(np.abs(v[:, 1]) > 4.0) & (v[:, 0] > 0)]
            nearest = own[np.argmin(own[:, 0])]
            assert 35.0 <= nearest[0] <= 60.0 and nearest[2] <= 2.5, "a stopped or crawling car ahead in the ego's lane"
            assert other[:, 0].min() < 55.0, "traffic in the other lane within reach"
            assert sorted(np.round(np.abs(su.lanes))) == [0.0, 5.0]
    finally:
        env.close()


def test_scenario_1_traffic_is_in_the_way_of_a_driver_blind_to_it():
    """The traffic-blind PID + pure pursuit runs into the blocker; the privileged driver passes it."""
    env = _env("env.scenario=1")
    try:
        cfg = load_config(overrides=["env.scenario=1"])
        blind = baseline_for(cfg, env.backend.dt)
        privileged = baseline_for(cfg, env.backend.dt, env.backend.surroundings)
        for seed in (0, 3):
            crash = run_episode(env, blind, seed)
            assert (crash["termination"], crash["collision_kind"]) == ("collision", "rear_end")
            result = run_episode(env, privileged, seed)
            assert result["termination"] == "route_completed" and result["lane_invasions"] >= 2
            assert result["collision_kind"] is None
    finally:
        env.close()


def test_the_obstacle_distance_is_the_gap_to_the_car_ahead_in_the_egos_lane():
    """Bumper to bumper (the 5 m cars' centres less 5 m), across road segments, up to 20 m; the
    traffic-blind driver closes it to the blocker until the crash, under the headway penalty."""
    cfg = load_config(overrides=["env.scenario=1", "env.reward.headway_penalty=3"])
    env = make_env(cfg)
    try:
        blind = baseline_for(cfg, env.backend.dt)
        obs, _ = env.reset(seed=0)
        seen, charged = [], []
        for _ in range(400):
            obs, _, terminated, _, info = env.step(blind(obs))
            if terminated:
                break
            v = env.backend.surroundings().vehicles
            own = v[(np.abs(v[:, 1] - env._state.lateral_offset) < 2.5) & (v[:, 0] > 0)]
            gap = own[:, 0].min() - 5.0 if len(own) else np.inf
            assert info["obstacle_distance"] == (pytest.approx(gap) if gap <= 20 else np.inf)
            seen.append(info["obstacle_distance"])
            charged.append(info["rewards"]["safety"] < 0)
        assert info["collision_kind"] == "rear_end" and 0 <= min(seen) < 2 and any(charged)
    finally:
        env.close()


def test_emergency_braking_stops_a_driver_blind_to_traffic_behind_the_blocker():
    """The traffic-blind driver hits scenario 1's blocker at speed (test above). With
    env.aeb_gap_m the env brakes for it and stops it short of the blocker; stopped, the throttle is
    the driver's again, and one that keeps it floored only creeps on, braked every other step."""
    cfg = load_config(overrides=["env.scenario=1", "env.aeb_gap_m=2"])
    env = make_env(cfg)
    try:
        blind = baseline_for(cfg, env.backend.dt)
        obs, _ = env.reset(seed=0)
        braked, stopped_at, info = 0, None, {}
        for _ in range(400):
            obs, _, terminated, _, info = env.step(blind(obs))
            braked += info["aeb"]
            if stopped_at is None and info["speed"] < 0.5 and braked:
                stopped_at = info["obstacle_distance"]
            if terminated:
                break
        assert 1.0 < stopped_at < 5.0 and braked > 0
        assert info["collision_kind"] == "rear_end" and info["speed"] < 1.0
    finally:
        env.close()


def test_gap_features_show_the_gap_and_how_fast_it_closes():
    cfg = load_config(overrides=["env.scenario=1", "env.gap_features=true"])
    env = make_env(cfg)
    try:
        blind = baseline_for(cfg, env.backend.dt)
        obs, _ = env.reset(seed=0)
        assert env.observation_space["vector"].shape == (55,) and obs["vector"].shape == (55,)
        closing = []
        for _ in range(400):
            obs, _, terminated, _, info = env.step(blind(obs))
            if terminated:
                break
            gap, speed = obs["vector"][-2:]
            assert gap == pytest.approx(min(info["obstacle_distance"], 20.0) / 20.0)
            if gap < 1:
                closing.append(speed * SPEED_NORM)
        assert np.mean(closing) > 3.0  # the traffic-blind driver closes on the stopped or crawling blocker
    finally:
        env.close()


def test_traffic_features_list_the_nearest_vehicles_relative_to_the_ego():
    """env.traffic_features=4 appends 4 x 5 features: the nearest vehicles from the simulator's
    truth, nearest first, relative to the ego, zeros where fewer are within 40 m."""
    cfg = load_config(overrides=["env.scenario=2", "env.traffic_features=4"])
    env = make_env(cfg)
    try:
        obs, _ = env.reset(seed=3)
        assert env.observation_space["vector"].shape == (73,) and obs["vector"].shape == (73,)
        obs, _, _, _, info = env.step(np.zeros(2, np.float32))
        rows = obs["vector"][53:].reshape(4, 5)
        around = env.backend.surroundings()
        near = around.vehicles[np.abs(around.vehicles[:, 0]) < 40.0]
        assert rows[:, 0].sum() == min(len(near), 4) > 0
        ahead, beside = rows[:, 1] * 40.0, rows[:, 2] * LATERAL_NORM
        listed = rows[:, 0] == 1
        assert np.all(np.diff(np.hypot(ahead, beside)[listed]) >= -1e-3)  # nearest first
        lateral = obs["vector"][1] * LATERAL_NORM
        first = near[np.argmin(np.hypot(near[:, 0], near[:, 1] - lateral))]
        assert ahead[0] == pytest.approx(first[0], abs=1e-3) and beside[0] == pytest.approx(first[1] - lateral, abs=1e-3)
        assert rows[0, 3] * SPEED_NORM == pytest.approx(first[2] - info["speed"], abs=1e-3)
        assert np.all(rows[~listed] == 0)
    finally:
        env.close()


def test_traffic_features_must_not_be_negative():
    with pytest.raises(ConfigError, match="env.traffic_features=-1 must be >= 0"):
        load_config(overrides=["env.traffic_features=-1"])


def test_the_privileged_driver_only_follows_where_the_route_is_one_lane():
    """With env.lane_change off it waits behind the blocker instead of leaving the route's lane."""
    cfg = load_config(overrides=["env.scenario=1", "env.lane_change=false", "env.max_episode_steps=300"])
    env = make_env(cfg)
    try:
        result = run_episode(env, baseline_for(cfg, env.backend.dt, env.backend.surroundings), 0)
        assert result["lane_invasions"] == 0 and result["termination"] not in ("lane_departure", "collision")
    finally:
        env.close()


def test_scenario_2_is_dense_around_the_ego_and_traffic_cuts_in():
    env = _env("env.scenario=2")
    try:
        env.reset(seed=1)
        v = env.backend.surroundings().vehicles
        near = v[np.abs(v[:, 0]) < 50.0]
        assert len(near) >= 6 and (np.abs(near[:, 1]) < 1).any() and (np.abs(near[:, 1]) > 4).any()
        policy = baseline_for(load_config(overrides=["env.scenario=2"]), env.backend.dt, env.backend.surroundings)
        obs, _ = env.reset(seed=1)
        policy.reset()
        road = env.backend._env.road
        lanes = {id(c): c.lane_index[2] for c in road.vehicles[1:]}
        changes = 0
        for _ in range(300):
            obs, *_ = env.step(policy(obs))
            for car in road.vehicles[1:]:
                changes += car.lane_index[2] != lanes[id(car)]
                lanes[id(car)] = car.lane_index[2]
        assert changes >= 1, "MOBIL traffic changes lanes"
    finally:
        env.close()


def test_a_lane_change_is_legal_and_each_crossing_is_one_invasion():
    """Over into the other lane and back: two invasions, no termination, and lane keeping (measured from
    the car's lane) pays in the other lane; then off the road: off_road."""
    env = _env("env.embedded.traffic=[0,0,0]", "env.lane_change=true", "env.reward.lane_keeping_reference=lane")
    try:
        obs, _ = env.reset(seed=2)
        pid = PurePursuitPID(8.0, env.backend.dt, np.pi / 4, env.cfg)
        other = [x for x in env.backend.surroundings().lanes if abs(x) > 1][0]
        invasions, info = 0, {}

        def drive(offset, steps):
            nonlocal obs, invasions, info
            for _ in range(steps):
                speed = float(obs["vector"][0]) * SPEED_NORM
                look = shift_lookahead(decode_lookahead(obs["vector"], env.cfg), offset)
                obs, _, terminated, truncated, info = env.step(np.array([pid.steer(speed, look), pid.throttle_brake(speed)]))
                invasions += info["lane_invasion"]
                assert not (terminated or truncated), info["termination"]

        drive(other, 60)
        assert abs(float(obs["vector"][1]) * LATERAL_NORM - other) < 1.0 and invasions == 1
        assert info["rewards"]["lane_keeping"] > 1.0, "centred in the other lane, lane keeping pays"
        drive(0.0, 60)
        assert abs(float(obs["vector"][1]) * LATERAL_NORM) < 1.0 and invasions == 2
        for _ in range(100):
            obs, _, terminated, _, info = env.step(np.array([np.sign(other), 0.3]))  # away from the other lane (steer > 0 turns right)
            if terminated:
                break
        assert info["termination"] == "off_road"
    finally:
        env.close()
