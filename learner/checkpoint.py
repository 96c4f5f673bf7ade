"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, the serial
replay in an .npz read with allow_pickle=False.

Layout of a run directory:

    runs/<run>/checkpoints/step_000002000/{tensors.safetensors, state.json[, replay.npz]}
    runs/<run>/checkpoints/latest          (text: the name of the newest complete checkpoint)

A checkpoint is written to a temporary directory and renamed into place, and `latest` is
replaced atomically afterwards, so a crash mid-write never leaves `latest` pointing at a
partial checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.config import Config, from_dict
from common.networks import Policy, policy_for
from learner.td3 import TD3

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message names the path."""


def _optimizer_split(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = opt.state_dict()
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"{prefix}/state/{pid}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    # The CNN groups' lr is the adaptive monitor's 0-d tensor; JSON holds its value.
    return {"param_groups": [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]}


def _optimizer_join(meta: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    marker = f"{prefix}/state/"
    for name, value in tensors.items():
        if name.startswith(marker):
            pid, key = name[len(marker):].split("/", 1)
            state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    run_dir: Path,
    env_step: int,
    agent: TD3,
    state: dict[str, Any],
    replay: dict[str, np.ndarray] | None = None,
) -> Path:
    """Writes checkpoint `step_<env_step>`; `state` must be JSON-serialisable."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{env_step:09d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for mod_name, module in agent.modules().items():
        for key, value in module.state_dict().items():
            tensors[f"{mod_name}/{key}"] = value.detach().cpu().contiguous()
    optim_meta = {k: _optimizer_split(opt, k, tensors) for k, opt in agent.optimizers().items()}
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    meta = {
        "env_step": env_step,
        "updates": agent.updates,
        "cnn_lr_monitor": agent.cnn_lr.state_dict(),
        "optimizers": optim_meta,
        **state,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if replay is not None:
        np.savez(tmp / "replay.npz", **replay)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)
    return final


def resolve(path: Path) -> Path:
    """A run directory, its checkpoints directory or one checkpoint -> that checkpoint. A `latest`
    pointer file (`runs/latest`, `checkpoints/latest`) stands for the sibling it names."""
    if path.name == LATEST and path.is_file():
        path = path.parent / path.read_text().strip()
    for root in (path / "checkpoints", path):
        pointer = root / LATEST
        if pointer.is_file():
            path = root / pointer.read_text().strip()
            break
    if not (path / "state.json").is_file() or not (path / "tensors.safetensors").is_file():
        raise CheckpointError(f"no complete checkpoint at '{path}' (expected state.json and tensors.safetensors)")
    return path


def load(path: Path, agent: TD3) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Restores `agent` (networks, targets, optimizers, torch RNG); returns (state, replay arrays)."""
    ckpt = resolve(path)
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(str(ckpt / "tensors.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' cannot be read: {exc}") from exc
    for mod_name, module in agent.modules().items():
        prefix = f"{mod_name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for opt_name, opt in agent.optimizers().items():
        opt.load_state_dict(_optimizer_join(meta["optimizers"][opt_name], opt_name, tensors))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    agent.updates = int(meta["updates"])
    agent.cnn_lr.load_state_dict(meta["cnn_lr_monitor"])
    agent.guard.forget()
    replay = None
    if (ckpt / "replay.npz").is_file():
        with np.load(ckpt / "replay.npz", allow_pickle=False) as data:
            replay = {k: data[k] for k in data.files}
    return meta, replay


def saved_config(path: Path) -> Config:
    """The config a checkpoint was trained with, checked as any config is."""
    ckpt = resolve(path)
    try:
        data = json.loads((ckpt / "state.json").read_text())["config"]
        # Checkpoints from before these switches existed had no trunk, saw highway-env's vehicles
        # on a north-up camera and read the look-ahead in metres.
        data.setdefault("cnn", {}).setdefault("trunk_dim", 0)
        data.setdefault("env", {}).setdefault("embedded", {}).setdefault("camera_vehicles", "highway")
        data["env"]["embedded"].setdefault("camera_heading_up", False)
        data["env"].setdefault("lookahead_features", "metres")
        return from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' holds no usable config: {exc}") from exc


def load_policy(path: Path, cfg: Config) -> Policy:
    """The policy (actor CNN + head) of a checkpoint, alone: what an evaluation needs."""
    ckpt = resolve(path)
    try:
        tensors = load_file(str(ckpt / "tensors.safetensors"))
        policy = policy_for(cfg)
        policy.load_state_dict({k[len("actor/"):]: v for k, v in tensors.items() if k.startswith("actor/")})
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' holds no policy that fits its config: {exc}") from exc
    return policy.eval()
