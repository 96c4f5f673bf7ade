"""`learner.compile`: the update traces into whole graphs (no graph break: nothing read back, no
Python branch on a computed value), the compiled update computes what the plain one does, and a
compilation that fails falls back to eager with the reason logged. Inductor's code generation
(gcc on the CPU) takes minutes on two busy cores: that test is slow (`make test-all`, and the GPU
check deploy/device/check.sh); AOTAutograd's tracing alone (`aot_eager`) is quick."""

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from common.batch import Batch
from common.config import load_config
from learner.compiled import failures
from learner.compiled import COMPILED_METHODS
from learner.td3 import TD3, read_back
from tests.conftest import random_batch_arrays

# Deterministic: no target smoothing noise, no random shift (inductor draws its own random
# numbers), the actor from the first actor update; a small batch keeps compilation short.
SAME_WORK = ["td3.policy_noise=0", "td3.augment_shift=0", "td3.critic_warmup_updates=0", "td3.batch_size=4"]
DEVICES = [torch.device("cpu"), pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the compiled update on a GPU is not exercised here"))]


def agent_on(device: torch.device, mode: str, like: TD3 | None = None) -> TD3:
    torch.manual_seed(0)
    agent = TD3(load_config(overrides=[*SAME_WORK, f"learner.compile={mode}", "learner.amp=false"]), device)
    if like is not None:
        for name, module in agent.modules().items():
            module.load_state_dict(like.modules()[name].state_dict())
    return agent


def run(agent: TD3, updates: int) -> list[dict[str, float]]:
    out = []
    for seed in range(updates):
        metrics = read_back(agent.update(Batch.from_numpy(random_batch_arrays(4, seed, reward_scale=10.0), agent.device)))
        out.append({k: v for k, v in metrics.items() if k.startswith(("train/", "gradients/", "debug/q"))})
    return out


def with_backend(monkeypatch, backend: str | Callable) -> None:
    """torch.compile, as learner/compiled.py calls it, with `backend` instead of inductor."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode: real(fn, backend=backend))


def same_updates(device: torch.device, mode: str) -> None:
    """Four updates (two critic-only, two with the actor) compiled with `mode` and plain: the same
    metrics and the same weights, within float tolerance."""
    plain = agent_on(device, "none")
    compiled = agent_on(device, mode, like=plain)
    assert compiled.compiled and not plain.compiled
    got, want = run(compiled, 4), run(plain, 4)
    assert not failures(compiled), failures(compiled)
    assert got[1].keys() == want[1].keys() and "train/actor_loss" in got[1]
    for g, w in zip(got, want):
        np.testing.assert_allclose([g[k] for k in w], list(w.values()), rtol=1e-4, atol=1e-5)
    for name, module in plain.modules().items():
        for (key, p), q in zip(module.state_dict().items(), compiled.modules()[name].state_dict().values()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")


def test_the_update_traces_into_whole_graphs(monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with_backend(monkeypatch, "aot_eager")
    same_updates(torch.device("cpu"), "default")
    assert not counters["graph_break"], dict(counters["graph_break"])
    # encode, the critic loss, the actor loss (the augmentation is off here: no graph)
    assert counters["stats"]["unique_graphs"] == len(COMPILED_METHODS) - 1


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_update_equals_the_plain_one(device):
    if device.type == "cuda":  # TF32 would make "equal" a matter of 1e-3
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    same_updates(device, "reduce-overhead" if device.type == "cuda" else "default")


def test_a_compilation_that_fails_falls_back_to_eager_with_the_reason_logged(monkeypatch, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    with_backend(monkeypatch, broken_backend)
    plain = agent_on(torch.device("cpu"), "none")
    agent = agent_on(torch.device("cpu"), "default", like=plain)
    with caplog.at_level(logging.WARNING, logger="learner.compiled"):
        got, want = run(agent, 2), run(plain, 2)
    assert "encode" in failures(agent) and "no compiler here" in failures(agent)["encode"]
    assert "compiling encode failed, it runs eagerly from now on" in caplog.text
    assert "no compiler here" in caplog.text
    for g, w in zip(got, want):
        assert g == pytest.approx(w)
