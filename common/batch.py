"""The batch contract between a replay memory and the learner."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


OPTIONAL = ("indices", "weight", "driver", "driver_action")
"""The fields a batch may lack."""


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`; on CUDA an asynchronous copy from pinned memory, so the caller
    never waits for the device (the caching host allocator reuses that pinned memory only once
    the copy is done, so `a` may change at once)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


@dataclass
class Batch:
    """B transitions. Images stay uint8 until they are inside the networks."""

    image: torch.Tensor
    """(B, 4, 84, 84) uint8 frame stacks of the observations."""
    vector: torch.Tensor
    """(B, 53) float32 vector features of the observations."""
    action: torch.Tensor
    """(B, 2) float32 actions taken."""
    reward: torch.Tensor
    """(B,) float32 rewards."""
    next_image: torch.Tensor
    """(B, 4, 84, 84) uint8 frame stacks of the next observations."""
    next_vector: torch.Tensor
    """(B, 53) float32 vector features of the next observations."""
    done: torch.Tensor
    """(B,) float32: 1 where the episode terminated (no bootstrap); 0 for time-limit truncation."""
    discount: torch.Tensor
    """(B,) float32 gamma^k for the k rewards summed in `reward` (n-step returns; k = 1 for one step)."""
    indices: np.ndarray | None = None
    """(B,) int64 replay slots the transitions came from, on the host: where a sampler's new
    priorities go (`replay_server.sampler`). None for a batch not drawn from a replay."""
    weight: torch.Tensor | None = None
    """(B,) float32 importance weights of a prioritized sampler; None: uniform, all 1."""
    driver: torch.Tensor | None = None
    """(B,) float32: 1 where a driver's action for the observation is known (the action taken in a
    warm-up or guided episode, or the teacher's label, `actors.teacher_labels`), what
    `td3.bc_weight` clones; None: not recorded, all 0."""
    driver_action: torch.Tensor | None = None
    """(B, 2) float32: that action where `driver` is 1; None: the action taken."""

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], device: torch.device, **on_device: torch.Tensor) -> "Batch":
        """Moves numpy arrays to `device`, through pinned memory on CUDA; `on_device` are fields
        already there (frame stacks gathered from a copy of the frames on the device)."""
        tensors = {f.name: on_device[f.name] if f.name in on_device else to_device(arrays[f.name], device)
                   for f in fields(cls) if f.name not in OPTIONAL}
        optional = {k: to_device(arrays[k], device) for k in ("weight", "driver", "driver_action") if k in arrays}
        return cls(**tensors, indices=arrays.get("indices"), **optional)
