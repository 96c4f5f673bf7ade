"""A copy of the replay ring's frame store on the learner's device (`learner.replay_on_device`).

Frames are written once, in order, so the copy follows the ring by copying only the frames added
since the last batch. A batch then sends its frame slots (B x 8 integers) and the small arrays to
the device and gathers its frame stacks there, instead of gathering ~14 MB of uint8 stacks on the
host at batch 256 and copying them over every update. On CUDA every copy goes through pinned
memory without blocking (`to_device`), so the training thread never waits for the device: the
batch is queued behind the update before it, as the update is.
"""

from __future__ import annotations

import numpy as np
import torch

from common.batch import Batch, to_device
from replay_server.ring import FrameRing


class DeviceFrames:
    """`ring.frames` mirrored on `device`; `batch()` builds a `Batch` from `ring.gather(..., images=False)`."""

    def __init__(self, ring: FrameRing, device: torch.device) -> None:
        self.ring = ring
        self.device = device
        self.frames = torch.zeros(ring.frames.shape, dtype=torch.uint8, device=device)
        self.synced = 0
        """Frames of the ring (`frames_added`) the copy holds."""

    def sync(self) -> int:
        """Copies the frames added since the last call; returns how many."""
        ring, cap = self.ring, self.ring.frame_capacity
        start = max(self.synced, ring.frames_added - cap)  # older ones are overwritten already
        end = ring.frames_added
        n, a = end - start, start % cap
        pieces = [(a, min(n, cap - a)), (0, n - min(n, cap - a))]  # before and after the wrap
        for first, count in pieces:
            if count:
                self.frames[first:first + count].copy_(to_device(ring.frames[first:first + count], self.device))
        self.synced = end
        return end - start

    def batch(self, arrays: dict[str, np.ndarray]) -> Batch:
        """The batch of `arrays` (with "image_slots" and "next_image_slots"), stacks gathered here."""
        self.sync()
        slots = {k: to_device(arrays[f"{k}_slots"], self.device) for k in ("image", "next_image")}
        return Batch.from_numpy(arrays, self.device, **{k: self.frames[s] for k, s in slots.items()})
