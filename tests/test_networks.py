import torch
from torch import nn

from common.networks import FLAT_DIM, ActorHead, Critic, NatureCNN, Policy, frames_to_float


def test_conv_shapes_match_the_seeds():
    cnn = NatureCNN()
    x = torch.rand(2, 4, 84, 84) * 2 - 1
    a = cnn.conv1(x)
    b = cnn.conv2(a)
    c = cnn.conv3(b)
    assert a.shape[1:] == (32, 20, 20)
    assert b.shape[1:] == (64, 9, 9)
    assert c.shape[1:] == (64, 7, 7)
    assert torch.flatten(c, 1).shape[1] == FLAT_DIM == 3136
    assert cnn(x).shape == (2, 512)


def test_layernorm_sits_before_each_leaky_relu():
    cnn = NatureCNN("layernorm")
    norms = [m for m in cnn.modules() if isinstance(m, nn.LayerNorm)]
    assert [tuple(m.normalized_shape) for m in norms] == [(32, 20, 20), (64, 9, 9), (64, 7, 7), (512,)]
    seen = {}
    for name in ("ln1", "ln2", "ln3", "ln4"):
        getattr(cnn, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    out = cnn(torch.rand(3, 4, 84, 84) * 2 - 1)
    # The LayerNorm outputs are zero-mean per sample (normalised before the activation) ...
    for name, o in seen.items():
        assert o.flatten(1).mean(dim=1).abs().max() < 1e-4, name
    # ... and the features are LeakyReLU of the last one.
    torch.testing.assert_close(out, nn.functional.leaky_relu(seen["ln4"], 0.01))


def test_no_norm_ablation_has_no_layernorm():
    assert not any(isinstance(m, nn.LayerNorm) for m in NatureCNN("none").modules())


def test_seed_criteria_on_random_input():
    torch.manual_seed(0)
    cnn = NatureCNN()
    features = cnn(torch.rand(32, 4, 84, 84) * 2 - 1)
    per_sample_l2 = features.norm(dim=1)
    assert per_sample_l2.max() < 100
    assert -10 <= features.mean() <= 10
    assert features.std() < 50
    assert torch.isfinite(features).all()


def test_uint8_frames_become_minus_one_to_one_inside_the_model():
    frames = torch.tensor([0, 255, 128], dtype=torch.uint8)
    torch.testing.assert_close(frames_to_float(frames), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    cnn = NatureCNN()
    u8 = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    torch.testing.assert_close(cnn(u8), cnn(frames_to_float(u8)))


def test_heads_dimensions():
    head = ActorHead()
    assert head.net[0].in_features == 565 and head.net[-1].out_features == 2
    critic = Critic(num_q=2)
    assert len(critic.heads.qs) == 2
    assert all(q[0].in_features == 567 and q[-1].out_features == 1 for q in critic.heads.qs)
    action = Policy()(torch.zeros(2, 4, 84, 84, dtype=torch.uint8), torch.zeros(2, 53))
    assert action.shape == (2, 2) and action.abs().max() <= 1
