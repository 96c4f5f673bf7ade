import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from common import config as config_module
from common.config import Config, ConfigError, iter_fields, load_config
from common.profiles import DEVICE_FIELDS, describe
from learner.cli import build_parser, overrides_from_args

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("common", "actors", "learner", "replay_server")

# Fields declared for a capability whose code has not landed yet; each entry names the issue that
# will read it. Remove an entry when its code lands.
PENDING: dict[str, str] = {}


def _code() -> str:
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py") if p.name != "config.py"]
    return "\n".join(p.read_text() for p in files)


def test_every_config_field_is_read_by_the_code():
    code = _code()
    unread = [path for path in iter_fields() if not re.search(rf"\.{path.rsplit('.', 1)[-1]}\b", code)]
    assert set(unread) <= set(PENDING), f"config fields nobody reads: {sorted(set(unread) - set(PENDING))}"


def test_every_config_field_has_a_docstring():
    tree = ast.parse(Path(config_module.__file__).read_text())
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                        missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, missing


def test_yaml_files_load():
    for name in ("default.yaml", "carla.yaml", "seeds.yaml"):
        cfg = load_config(ROOT / "deploy" / "configs" / name)
        assert isinstance(cfg, Config)
    assert load_config(ROOT / "deploy/configs/carla.yaml").env.backend == "carla"


def test_the_seeds_arrangement_stays_selectable():
    seeds = load_config(ROOT / "deploy/configs/seeds.yaml")
    assert (seeds.cnn.norm, seeds.cnn.trunk_dim, seeds.td3.weight_decay_style) == ("layernorm", 0, "l2")
    assert (seeds.td3.pretanh_penalty, seeds.td3.critic_warmup_updates, seeds.td3.actor_encoder) == (0.0, 0, "own")
    default = Config()
    assert (default.cnn.trunk_dim, default.td3.weight_decay_style, default.td3.actor_encoder) == (50, "decoupled", "critic")
    assert default.td3.pretanh_penalty > 0 and default.td3.critic_warmup_updates > 0
    assert (seeds.env.lookahead_features, default.env.lookahead_features) == ("metres", "per_point")


def test_overrides_are_typed():
    cfg = load_config(overrides=["td3.gamma=0.98", "td3.batch_size=64", "env.scenario=2", "logging.debug=true",
                                 "env.embedded.traffic=[1,2,3]", "learner.max_timesteps=1e3"])
    assert cfg.td3.gamma == 0.98 and cfg.td3.batch_size == 64 and cfg.env.scenario == 2 and cfg.logging.debug
    assert cfg.env.embedded.traffic == [1, 2, 3] and cfg.learner.max_timesteps == 1000


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("td3.gamaa=0.9", "unknown config key 'td3.gamaa'. Did you mean 'gamma'?"),
        ("td4.gamma=0.9", "unknown config key 'td4'"),
        ("cnn.norm=batchnorm", "cnn.norm='batchnorm' is not valid; choose one of ['layernorm', 'none']"),
        ("env.scenario=3", "choose one of [0, 1, 2]"),
        ("td3.algo=sac", "choose one of ['td3', 'ddpg']"),
        ("td3.batch_size=12.5", "expected an integer"),
        ("td3.gamma=high", "expected a number"),
        ("logging.debug=maybe", "expected true or false"),
        ("td3.gamma=1.5", "td3.gamma=1.5 must be in (0, 1]"),
        ("replay.capacity=10", "replay.capacity=10 must be >= td3.batch_size="),
        ("learner.stop_at_success=1.5", "learner.stop_at_success=1.5 must be a success rate in [0, 1]"),
        ("learner.threads=-1", "learner.threads=-1 must be >= 0"),
        ("env.embedded.simulation_frequency=15", "multiple of env.embedded.policy_frequency"),
        ("carla.gpus=[0,0]", "carla.gpus=[0, 0] must list distinct GPU indices >= 0"),
        ("carla.gpus=[-1]", "carla.gpus=[-1] must list distinct GPU indices >= 0"),
        ("td3=3", "'td3' is a section"),
        ("gamma", "must look like section.key=value"),
    ],
)
def test_bad_config_fails_with_a_named_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("td3:\n  policy_delay: 2\n  polcy_noise: 0.3\n")
    with pytest.raises(ConfigError, match="td3.polcy_noise.*Did you mean 'policy_noise'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_old_flags_are_aliases():
    args = build_parser().parse_args(
        ["--scenario", "1", "--max-timesteps", "5000", "--eval-freq", "1000", "--checkpoint-freq", "2000",
         "--num-eval-episodes", "3", "--seed", "7", "--debug", "--device", "cpu", "--logdir", "/tmp/x",
         "--mode", "serial", "--set", "td3.tau=0.01"]
    )
    cfg = load_config(None, overrides_from_args(args))
    assert (cfg.env.scenario, cfg.learner.max_timesteps, cfg.eval.freq, cfg.learner.checkpoint_freq) == (1, 5000, 1000, 2000)
    assert (cfg.eval.num_episodes, cfg.seed, cfg.logging.debug, cfg.learner.device) == (3, 7, True, "cpu")
    assert (cfg.logging.logdir, cfg.mode, cfg.td3.tau) == ("/tmp/x", "serial", 0.01)


def test_cli_rejects_bad_choice(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scenario", "5"])
    assert "invalid choice: 5 (choose from 0, 1, 2)" in capsys.readouterr().err


def test_config_round_trips_through_dict():
    cfg = load_config(overrides=["td3.algo=ddpg", "env.scenario=1"])
    again = config_module.from_dict(dataclasses.asdict(cfg))
    assert again == cfg


# -- the device profiles (common/profiles.py): the values the docs state for each device ----------
DOCUMENTED = {
    "cpu": {"td3.batch_size": 64, "learner.updates_per_step": 0.5, "td3.learning_starts": 1000,
            "actors.envs_per_actor": 1, "learner.threads": 0},
    "cuda": {"td3.batch_size": 256, "learner.updates_per_step": 1.0, "td3.learning_starts": 5000,
             "actors.envs_per_actor": 8, "learner.threads": 1},
}


def _device_fields(cfg: Config) -> dict[str, object]:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in DEVICE_FIELDS.values()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_device_profile_fills_what_is_not_set(device):
    assert _device_fields(load_config(overrides=[f"learner.device={device}"])) == DOCUMENTED[device]


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_takes_the_profile_of_the_device_torch_finds(monkeypatch, cuda):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # the one stand-in: the device query
    cfg = load_config()
    assert cfg.learner.device == "auto" and _device_fields(cfg) == DOCUMENTED["cuda" if cuda else "cpu"]


def test_explicit_values_win_over_the_profile(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("learner:\n  device: cuda\ntd3:\n  batch_size: 32\n")
    cfg = load_config(own, ["learner.updates_per_step=2", "learner.threads=0"])
    assert _device_fields(cfg) == {**DOCUMENTED["cuda"], "td3.batch_size": 32, "learner.updates_per_step": 2.0,
                                   "learner.threads": 0}
    assert "td3.batch_size=32 (set)" in describe(cfg) and "td3.learning_starts=5000," in describe(cfg)
    hparams = config_module.flat_hparams(cfg)  # the run's config text and HPARAMS tab hold the resolved values
    assert (hparams["td3.batch_size"], hparams["td3.learning_starts"], hparams["learner.threads"]) == (32, 5000, 0)
    # The CARLA config trains on CUDA: the GPU profile, but its own learning start and one server per actor.
    carla = load_config(ROOT / "deploy/configs/carla.yaml")
    assert _device_fields(carla) == {**DOCUMENTED["cuda"], "td3.learning_starts": 10000, "actors.envs_per_actor": 1}


def test_a_saved_config_keeps_the_values_it_trained_with():
    saved = config_module.to_dict(load_config(overrides=["learner.device=cpu"]))
    saved["learner"]["device"] = "cuda"  # resumed or evaluated where a GPU is
    assert _device_fields(config_module.from_dict(saved)) == DOCUMENTED["cpu"]
    del saved["learner"]["threads"]  # a checkpoint from before the field existed
    assert config_module.from_dict(saved).learner.threads == DOCUMENTED["cuda"]["learner.threads"]


def test_the_default_run_is_defined_once():
    """deploy/configs/default.yaml sets nothing: the built-in defaults and profiles are the default run."""
    assert load_config(ROOT / "deploy/configs/default.yaml") == load_config()
    assert not yaml.safe_load((ROOT / "deploy/configs/default.yaml").read_text())


@pytest.mark.parametrize("scenario, overrides, lane_change", [
    (0, [], False),  # lane following behind a slow lead car: the route is one lane
    (1, [], True),   # traffic in the way: the route is the road
    (2, [], True),
    (0, ["env.lane_change=true"], True),
    (2, ["env.lane_change=false"], False),
])
def test_lane_changes_follow_the_scenario_unless_set(scenario, overrides, lane_change):
    cfg = load_config(overrides=[f"env.scenario={scenario}", *overrides])
    assert cfg.env.lane_change is lane_change
    assert config_module.flat_hparams(cfg)["env.lane_change"] is lane_change
    assert config_module.from_dict(config_module.to_dict(cfg)).env.lane_change is lane_change
