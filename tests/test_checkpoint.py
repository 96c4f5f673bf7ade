import json

import numpy as np
import pytest
import torch

from common.config import load_config
from learner import checkpoint
from learner.td3 import TD3
from tests.test_td3 import tiny_batch

CPU = torch.device("cpu")


def params(agent: TD3) -> dict[str, torch.Tensor]:
    return {f"{n}/{k}": v.clone() for n, m in agent.modules().items() for k, v in m.state_dict().items()}


def test_next_update_after_resume_equals_uninterrupted(tmp_path):
    cfg = load_config(overrides=["learner.device=cpu", "learner.feature_l2_threshold=1.0", "learner.lr_cooldown_updates=2"])
    torch.manual_seed(0)
    a = TD3(cfg, CPU)
    for i in range(3):
        a.update(tiny_batch(seed=i))
    checkpoint.save(tmp_path, 3, a, {"episodes": 0})
    metrics_a = a.update(tiny_batch(seed=3))
    torch.manual_seed(123)  # a different init and RNG: everything must come from the checkpoint
    b = TD3(cfg, CPU)
    state, replay = checkpoint.load(tmp_path, b)
    assert state["env_step"] == 3 and replay is None and b.updates == 3
    metrics_b = b.update(tiny_batch(seed=3))
    assert metrics_a == metrics_b  # includes the target-noise draw, the adaptive lr and its cooldown
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=k)
    assert a.actor_opt.param_groups[0]["lr"] == b.actor_opt.param_groups[0]["lr"] < 1e-4


def test_checkpoint_files_hold_no_pickle(tmp_path):
    agent = TD3(load_config(overrides=["learner.device=cpu"]), CPU)
    agent.update(tiny_batch())
    path = checkpoint.save(tmp_path, 10, agent, {"episodes": 1}, {"x": np.arange(3)})
    assert sorted(p.name for p in path.iterdir()) == ["replay.npz", "state.json", "tensors.safetensors"]
    json.loads((path / "state.json").read_text())
    assert (tmp_path / "checkpoints" / "latest").read_text() == path.name
    with np.load(path / "replay.npz", allow_pickle=False) as data:
        assert list(data["x"]) == [0, 1, 2]


def test_missing_or_partial_checkpoint_is_a_named_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path)):
        checkpoint.resolve(tmp_path)
    agent = TD3(load_config(overrides=["learner.device=cpu"]), CPU)
    path = checkpoint.save(tmp_path, 5, agent, {})
    (path / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(tmp_path, agent)


def test_a_checkpoint_from_before_the_trunk_still_loads(tmp_path):
    from common.config import to_dict

    cfg = load_config(overrides=["learner.device=cpu", "cnn.trunk_dim=0", "td3.weight_decay_style=l2"])
    agent = TD3(cfg, CPU)
    saved = to_dict(cfg)
    # what a checkpoint written before cnn.trunk_dim, the contrast and heading-up camera and
    # env.lookahead_features existed holds
    del saved["cnn"]["trunk_dim"], saved["env"]["embedded"]["camera_vehicles"], saved["env"]["lookahead_features"]
    del saved["env"]["embedded"]["camera_heading_up"]
    path = checkpoint.save(tmp_path, 7, agent, {"config": saved})
    old = checkpoint.saved_config(path)
    assert old.cnn.trunk_dim == 0
    assert old.env.embedded.camera_vehicles == "highway"  # evaluated on the camera it was trained on
    assert not old.env.embedded.camera_heading_up
    assert old.env.lookahead_features == "metres"  # and on the vector it was trained on
    policy = checkpoint.load_policy(path, old)
    for k, v in agent.actor.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[k], v)
    with pytest.raises(checkpoint.CheckpointError, match="fits its config"):
        checkpoint.load_policy(path, load_config(overrides=["cnn.trunk_dim=50"]))
