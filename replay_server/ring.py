"""The learner-side replay ring: each 84x84 uint8 frame stored once, transitions as frame ids.

Frame-index arithmetic (the classic off-by-one lives here):

- Every frame gets a global, monotonically increasing id; it lives at `frames[id % F]`.
- An episode contributes its reset frame f0, then one new frame per step: step t (t = 1, 2, ...)
  adds f_t, the newest frame of the next observation.
- The observation before step t stacks frames f_{t-4} .. f_{t-1}, the next observation
  f_{t-3} .. f_t, where any f_k with k < 0 is f_0 (the env repeats the reset frame, and so do
  we). A transition therefore stores 5 ids `[f_{t-4}, f_{t-3}, f_{t-2}, f_{t-1}, f_t]`:
  observation = ids[0:4], next observation = ids[1:5]. Stacks never cross episodes because ids
  are only ever taken from one episode's own history.
- FIFO: transitions leave in insertion order, and before a frame slot is overwritten every
  transition that still refers to the old frame is evicted first, so a sample can never mix
  frames of different ages.

n-step returns: each transition keeps the global index of the next transition of its episode
(`successor`, -1 until that one arrives, and forever after a terminal or truncated step). A
sample follows those links up to n - 1 times, so it never crosses episodes; a successor is newer
than its predecessor, so FIFO eviction never leaves a link to a transition that is gone.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from common.chunk import Chunk
from common.driving import ACTION_DIM, FRAME_SIZE, FRAME_STACK, VECTOR_DIM

IDS_PER_TRANSITION = FRAME_STACK + 1


class FrameRing:
    """Fixed-capacity FIFO replay of transitions over a shared frame store."""

    def __init__(self, capacity: int, frame_capacity: int | None = None, vector_dim: int = VECTOR_DIM) -> None:
        self.capacity = int(capacity)
        # One new frame per transition plus one per episode start; a quarter of slack covers
        # episodes down to 4 steps before eviction is driven by frames rather than transitions.
        self.frame_capacity = int(frame_capacity or capacity + capacity // 4 + IDS_PER_TRANSITION)
        self.frames = np.zeros((self.frame_capacity, FRAME_SIZE, FRAME_SIZE), np.uint8)
        n = self.capacity
        self.frame_ids = np.zeros((n, IDS_PER_TRANSITION), np.int64)
        self.vector = np.zeros((n, vector_dim), np.float32)
        self.next_vector = np.zeros((n, vector_dim), np.float32)
        self.action = np.zeros((n, ACTION_DIM), np.float32)
        self.reward = np.zeros((n,), np.float32)
        self.done = np.zeros((n,), np.float32)
        self.driver = np.zeros((n,), np.float32)
        """1 where a driver's action for the observation is known: the action taken, where a driver
        acted (warm-up or guided episode), or the teacher's label (`actors.teacher_labels`)."""
        self.driver_action = np.zeros((n, ACTION_DIM), np.float32)
        """That action, where `driver` is 1."""
        self.successor = np.full((n,), -1, np.int64)
        self.frames_added = 0  # next frame id
        self.head = 0  # transitions ever added
        self.tail = 0  # oldest live transition (global index)
        # (actor, episode) -> (next start step, ids of its last frames, global index of its last
        # transition): consecutive chunks of an episode share up to 4 frames, which are then stored
        # once here too, their transitions are linked for n-step returns, and a chunk resent after a
        # lost acknowledgement is recognised.
        self._episodes: OrderedDict[tuple[int, int], tuple[int, list[int], int]] = OrderedDict()

    def __len__(self) -> int:
        return self.head - self.tail

    def add_frame(self, frame: np.ndarray) -> int:
        """Stores a frame and returns its id, first evicting transitions that refer to the slot's old frame."""
        fid = self.frames_added
        overwritten = fid - self.frame_capacity
        while self.tail < self.head and self.frame_ids[self.tail % self.capacity, 0] <= overwritten:
            self.tail += 1
        self.frames[fid % self.frame_capacity] = frame
        self.frames_added += 1
        return fid

    def add_transition(
        self, frame_ids: np.ndarray, vector: np.ndarray, action: np.ndarray, reward: float, next_vector: np.ndarray, done: bool,
        driver: bool = False, teacher: np.ndarray | None = None,
    ) -> int:
        """Stores one transition and returns its global index. `driver`: a driver took `action`;
        `teacher`: the privileged driver's action for this observation, whoever acted (the one
        cloned where given)."""
        if len(self) == self.capacity:
            self.tail += 1
        i = self.head % self.capacity
        self.frame_ids[i] = frame_ids
        self.vector[i] = vector
        self.action[i] = action
        self.reward[i] = reward
        self.next_vector[i] = next_vector
        self.done[i] = float(done)
        self.driver[i] = float(driver or teacher is not None)
        self.driver_action[i] = action if teacher is None else teacher
        self.successor[i] = -1
        self.head += 1
        return self.head - 1

    def _link(self, previous: int, current: int) -> None:
        if previous >= self.tail:  # an evicted transition's slot belongs to someone else now
            self.successor[previous % self.capacity] = current

    def add_chunk(self, chunk: Chunk) -> bool:
        """Stores a decoded chunk: its new frames once, its transitions as frame ids.

        Returns False, storing nothing, for a chunk of an episode that already went past its
        start step (a resend after a lost acknowledgement).
        """
        key = (chunk.actor_id, chunk.episode_id)
        known = self._episodes.pop(key, None)
        if known is not None and chunk.start_step < known[0]:
            self._episodes[key] = known
            return False
        ids: list[int] = []
        if known is not None and known[0] == chunk.start_step:
            shared = known[1][-(min(chunk.start_step, FRAME_STACK - 1) + 1):]
            if shared[0] >= self.frames_added - self.frame_capacity:  # not overwritten yet
                ids = list(shared)
        ids += [self.add_frame(f) for f in chunk.frames[len(ids):]]
        stacks = np.asarray(ids, np.int64)[chunk.stack_rows()]
        previous = known[2] if known is not None and known[0] == chunk.start_step else -1
        driver = chunk.driver if chunk.driver is not None else np.zeros(chunk.steps, bool)
        for i in range(chunk.steps):
            current = self.add_transition(stacks[i], chunk.vectors[i], chunk.actions[i], float(chunk.rewards[i]),
                                          chunk.vectors[i + 1], bool(chunk.terminated[i]), bool(driver[i]),
                                          None if chunk.teacher is None else chunk.teacher[i])
            if previous >= 0:
                self._link(previous, current)
            previous = current
        self._episodes[key] = (chunk.start_step + chunk.steps, ids[-FRAME_STACK:], previous)
        while len(self._episodes) > 4096:
            self._episodes.popitem(last=False)
        return True

    def gather(self, idx: np.ndarray, n_step: int = 1, gamma: float = 0.99, images: bool = True) -> dict[str, np.ndarray]:
        """Rebuilds stacked observations for ring slots `idx`, with n-step returns.

        `reward` is the discounted sum of up to `n_step` rewards of the episode from `idx` on, the
        next observation and `done` are those of the last step summed, and `discount` is
        gamma^k for the k steps summed: fewer than n where the episode ended or its next
        transitions have not arrived yet. Without `images`, the frame stacks come as their slots
        in `frames` ("image_slots", "next_image_slots"), for a copy of the frames kept elsewhere.
        """
        last = idx.copy()
        reward = self.reward[idx].astype(np.float64)
        discount = np.full(len(idx), gamma, np.float64)
        for _ in range(n_step - 1):
            nxt = self.successor[last]
            go = (nxt >= 0) & (self.done[last] == 0.0)
            if not go.any():
                break
            last = np.where(go, nxt % self.capacity, last)
            reward += np.where(go, discount * self.reward[last], 0.0)
            discount = np.where(go, discount * gamma, discount)
        first = self.frame_ids[idx, :FRAME_STACK] % self.frame_capacity
        final = self.frame_ids[last, 1:] % self.frame_capacity
        stacks = {"image": self.frames[first], "next_image": self.frames[final]} if images else {
            "image_slots": first, "next_image_slots": final}
        return {
            **stacks,
            "vector": self.vector[idx],
            "action": self.action[idx],
            "reward": reward.astype(np.float32),
            "next_vector": self.next_vector[last],
            "done": self.done[last],
            "discount": discount.astype(np.float32),
            "driver": self.driver[idx],
            "driver_action": self.driver_action[idx],
        }

    # -- persistence (numpy arrays only; loaded with allow_pickle=False) --------------------
    _FRAME_ARRAYS = ("frames",)
    _TRANSITION_ARRAYS = ("frame_ids", "vector", "next_vector", "action", "reward", "done", "successor", "driver",
                          "driver_action")

    def state(self) -> dict[str, np.ndarray]:
        """The filled part of every array (a fresh ring saves small) plus the counters."""
        counters = np.array([self.capacity, self.frame_capacity, self.frames_added, self.head, self.tail], np.int64)
        nf, nt = min(self.frames_added, self.frame_capacity), min(self.head, self.capacity)
        return {
            "counters": counters,
            **{k: getattr(self, k)[:nf] for k in self._FRAME_ARRAYS},
            **{k: getattr(self, k)[:nt] for k in self._TRANSITION_ARRAYS},
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "FrameRing":
        capacity, frame_capacity, frames_added, head, tail = (int(v) for v in state["counters"])
        ring = cls(capacity, frame_capacity)
        filled = {k: min(frames_added, frame_capacity) for k in cls._FRAME_ARRAYS}
        filled |= {k: min(head, capacity) for k in cls._TRANSITION_ARRAYS}
        for k, n in filled.items():
            if k in ("successor", "driver", "driver_action") and k not in state:
                # Saved before n-step links (no links: 1-step samples), driver marks (none) or teacher
                # labels (a driver's action is the one it took).
                if k == "driver_action":
                    ring.driver_action[:n] = state["action"]
                continue
            target = getattr(ring, k)[:n]
            if state[k].shape != target.shape or state[k].dtype != target.dtype:
                raise ValueError(f"replay state array '{k}' is {state[k].shape} {state[k].dtype}, "
                                 f"expected {target.shape} {target.dtype}")
            target[...] = state[k]
        ring.frames_added, ring.head, ring.tail = frames_added, head, tail
        return ring
