"""The learner's CUDA paths: fused Adam, bf16 autocast with fp32 heads, channels_last, pinned
non-blocking copies, the replay's frames copied to the GPU, GPU memory metrics, and a policy
published from a GPU learner acting on a CPU actor. They run where torch sees a GPU; elsewhere
pytest reports them as skipped, with the reason."""

import numpy as np
import pytest
import torch

from common.batch import Batch
from common.config import load_config
from common.networks import policy_for
from common.weights import load_policy_bytes, policy_to_bytes
from learner.learner import rss_and_gpu_metrics
from learner.td3 import TD3
from tests.conftest import random_batch_arrays

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the learner's CUDA paths are not exercised on this machine")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Deterministic across devices: no target smoothing noise, no random shift, the actor from update 1.
SAME_WORK = ["td3.policy_noise=0", "td3.augment_shift=0", "td3.critic_warmup_updates=0", "td3.batch_size=16"]


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """TF32 (on by default for cuDNN convolutions) would make "same results" a matter of 1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def agent_on(device: torch.device, *overrides: str, like: TD3 | None = None) -> TD3:
    """An agent on `device`; with `like`, with that agent's weights."""
    torch.manual_seed(0)
    agent = TD3(load_config(overrides=[*SAME_WORK, *overrides]), device)
    if like is not None:
        for name, module in agent.modules().items():
            module.load_state_dict(like.modules()[name].state_dict())
    return agent


def batches(n: int, b: int = 16) -> list[dict[str, np.ndarray]]:
    return [random_batch_arrays(b, seed, reward_scale=10.0) for seed in range(n)]


def losses(agent: TD3, arrays: list[dict[str, np.ndarray]]) -> list[tuple[float, float]]:
    out = []
    for a in arrays:
        m = agent.update(Batch.from_numpy(a, agent.device))
        assert m["alerts/nonfinite_loss"] == 0.0
        out.append((m["train/critic_loss"], m.get("train/actor_loss", 0.0)))
    return out


def test_updates_on_cuda_match_the_cpu():
    cpu = agent_on(CPU, "learner.amp=false", "learner.channels_last=false")
    gpu = agent_on(CUDA, "learner.amp=false", "learner.channels_last=false", like=cpu)
    assert all(g.get("fused") for opt in gpu.optimizers().values() for g in opt.param_groups)
    arrays = batches(6)
    np.testing.assert_allclose(losses(gpu, arrays), losses(cpu, arrays), rtol=1e-3, atol=1e-4)
    for name, module in cpu.modules().items():
        for (key, p_cpu), p_gpu in zip(module.state_dict().items(), gpu.modules()[name].state_dict().values()):
            torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-3, atol=1e-3, msg=f"{name}.{key}")


def test_the_update_and_its_batch_never_wait_for_the_gpu():
    """No host sync on the training thread: a batch's copies (pinned, non-blocking), with its
    frame stacks from the host or gathered from the frames' copy on the GPU, the update, a skipped
    update and the guard's restore check. torch raises on any synchronizing call."""
    from learner.device_frames import DeviceFrames
    from replay_server.ring import FrameRing
    from tests.bench.learner import fill_ring

    agent = agent_on(CUDA, "learner.nonfinite_restore_after=1")
    arrays = batches(3)
    arrays[1]["reward"][0] = np.nan
    ring, rng = FrameRing(500), np.random.default_rng(0)
    fill_ring(ring, 600)
    mirror = DeviceFrames(ring, CUDA)
    for a in arrays:  # the first updates allocate
        agent.update(Batch.from_numpy(a, CUDA))
    agent.update(mirror.batch(ring.sample(16, rng, images=False)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in [arrays[0], arrays[1], *arrays * agent.guard.check_every]:
            agent.update(Batch.from_numpy(a, CUDA))
        mirror.synced = 0  # every frame to copy over again
        agent.update(mirror.batch(ring.sample(16, rng, images=False)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(agent.guard.skipped) >= 2


def test_channels_last_changes_the_layout_not_the_results():
    plain = agent_on(CUDA, "learner.amp=false", "learner.channels_last=false")
    nhwc = agent_on(CUDA, "learner.amp=false", "learner.channels_last=true", like=plain)
    conv = next(m for m in nhwc.critic.cnn.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    arrays = batches(4)
    np.testing.assert_allclose(losses(nhwc, arrays), losses(plain, arrays), rtol=1e-3, atol=1e-4)


def test_bf16_autocast_runs_the_cnns_in_bf16_and_keeps_q_in_fp32():
    fp32 = agent_on(CUDA, "learner.amp=false")
    amp = agent_on(CUDA, "learner.amp=true", like=fp32)
    assert amp.amp
    batch = Batch.from_numpy(random_batch_arrays(16, reward_scale=300.0), CUDA)
    assert amp.encode(batch).dtype == torch.bfloat16
    y = amp.target_q(batch)
    assert y.dtype == torch.float32
    # Q around 300: in bf16 every target would be a multiple of 2.
    assert not torch.all(torch.remainder(y, 2.0) == 0)
    arrays = batches(4)
    # bf16 features: close to the fp32 path, not equal.
    np.testing.assert_allclose(losses(amp, arrays), losses(fp32, arrays), rtol=0.2, atol=0.1)
    assert all(p.dtype == torch.float32 for p in amp.critic.parameters())


def test_batches_reach_the_gpu_intact_through_pinned_memory():
    arrays = random_batch_arrays(8)
    batch = Batch.from_numpy(arrays, CUDA)
    torch.cuda.synchronize()
    for name, a in arrays.items():
        t = getattr(batch, name)
        assert t.device.type == "cuda" and t.dtype == torch.from_numpy(a).dtype
        np.testing.assert_array_equal(t.cpu().numpy(), a)


def test_a_policy_published_by_a_gpu_learner_acts_the_same_on_a_cpu_actor():
    gpu = agent_on(CUDA)
    losses(gpu, batches(2))
    cfg = load_config(overrides=SAME_WORK)
    actor = policy_for(cfg)
    load_policy_bytes(actor, policy_to_bytes(gpu.actor))
    arrays = random_batch_arrays(8)
    image, vector = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["vector"])
    with torch.no_grad():
        torch.testing.assert_close(actor(image, vector), gpu.actor(image.to(CUDA), vector.to(CUDA)).cpu(),
                                   rtol=1e-4, atol=1e-4)


def test_the_learner_reports_gpu_memory():
    gpu = agent_on(CUDA)
    losses(gpu, batches(1))
    metrics = rss_and_gpu_metrics(CUDA)
    assert metrics["perf/gpu_memory_allocated_mb"] > 0
    assert metrics["perf/gpu_memory_reserved_mb"] >= metrics["perf/gpu_memory_allocated_mb"]


def test_an_actor_on_the_gpu_acts_as_on_the_cpu():
    from actors.actor import Actor, acting_device

    cfg = load_config(overrides=[*SAME_WORK, "actors.device=cuda", "actors.num_gpus=0.5"])
    device = acting_device(cfg)
    torch.manual_seed(0)
    on_cpu = policy_for(cfg).eval()
    on_gpu = policy_for(cfg).eval().to(device)
    on_gpu.load_state_dict(on_cpu.state_dict())
    arrays = random_batch_arrays(4)
    observations = [{"image": arrays["image"][i], "vector": arrays["vector"][i]} for i in range(4)]
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(Actor(on_gpu, cfg, rng, device).policy_actions(observations),
                               Actor(on_cpu, cfg, rng, CPU).policy_actions(observations), rtol=1e-4, atol=1e-4)


def test_batches_gathered_from_a_copy_of_the_frames_on_the_gpu_equal_the_host_ones():
    from learner.device_frames import DeviceFrames
    from replay_server.ring import FrameRing
    from replay_server.sampler import UniformSampler
    from tests.bench.learner import fill_ring

    ring = FrameRing(500)
    fill_ring(ring, 1000)  # the frame store has wrapped around
    mirror = DeviceFrames(ring, CUDA)
    idx, _ = UniformSampler().choose(ring, 32, np.random.default_rng(0))
    want = Batch.from_numpy(ring.gather(idx, n_step=3), CPU)
    got = mirror.batch(ring.gather(idx, n_step=3, images=False))
    for field in ("image", "next_image", "vector", "reward", "discount"):
        torch.testing.assert_close(getattr(got, field).cpu(), getattr(want, field), rtol=0, atol=0)
