"""The experiment definitions: every arm is a valid config, and (slow) a tiny end-to-end run."""

from pathlib import Path

import pytest

from common.config import flat_hparams, load_config
from tests.bench.experiments import CPU_FRIENDLY, LEARN_ARMS, _arm_seeds, _split

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arm", sorted(LEARN_ARMS))
def test_every_learn_arm_is_a_valid_config(arm):
    extra, overrides = _split(LEARN_ARMS[arm])
    cfg = load_config(ROOT / extra[1] if extra else None, [*CPU_FRIENDLY, *overrides])
    # Each arm differs from its base (the seeds' arrangement or the default) in exactly the switches
    # it names: one for an ablation, two for a combination.
    base = load_config(ROOT / "deploy/configs/seeds.yaml" if arm.startswith("seeds") else None, CPU_FRIENDLY)
    changed = [k for k, v in flat_hparams(cfg).items() if flat_hparams(base)[k] != v]
    assert sorted(changed) == sorted(o.split("=")[0] for o in overrides), changed


def test_an_arm_can_name_its_own_training_seeds():
    """--arms default,default+per:1/3 runs default on every --seeds, default+per on seeds 1 and 3."""
    assert _arm_seeds("default", [1, 2, 3]) == ("default", [1, 2, 3])
    assert _arm_seeds("default+per:1/3", [1, 2, 3]) == ("default+per", [1, 3])


@pytest.mark.slow
def test_a_tiny_learn_experiment_writes_its_table(tmp_path, monkeypatch):
    pytest.importorskip("stable_baselines3")
    import tests.bench.experiments as experiments

    monkeypatch.setattr(experiments, "RESULTS", tmp_path)
    experiments.experiment_learn(200, 100, 1, ["default", "sb3-vector:2"], [1], 0, 2,
                                 ["td3.learning_starts=50", "env.max_episode_steps=40", "td3.critic_warmup_updates=5"])
    table = (tmp_path / "experiment_learn.md").read_text()
    assert "training seeds 1 (sb3-vector seed 2)" in table
    assert "| default |" in table and "| sb3-vector |" in table and "| privileged baseline (IDM + lane change) |" in table
    criteria = table.split("The seeds' criteria")[1]
    assert "| default | " in criteria and "| sb3-vector |" not in criteria  # a peer has no learner logs
    assert (tmp_path / "experiment_learn.png").is_file()
