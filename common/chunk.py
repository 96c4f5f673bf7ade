"""The replay chunk: consecutive steps of one episode, as actors send them. Versioned binary, no pickle.

Frame arithmetic. Within an episode, frame f_0 is the reset frame and step k (k = 0, 1, ...)
produces f_{k+1}. Transition k has observation frames f_{k-3} .. f_k and next-observation
frames f_{k-2} .. f_{k+1}, where f_j for j < 0 means f_0 (the env pads with the reset frame).
A chunk holding transitions k0 .. k0+T-1 therefore needs frames f_a .. f_{k0+T} with
a = max(0, k0 - 3): T + 1 + min(k0, 3) frames, each stored once. In the chunk, frame f_j sits at
row j - a, so transition k's stack rows are [max(k+i, 0) - a for i in (-3, -2, -1, 0, 1)]:
rows 0..3 give the observation, rows 1..4 the next observation.

Layout (little-endian):

    header   HEADER struct (magic b"AVT3", version, sizes, ids; see `HEADER`), then (version 2
             on) the vector length, uint16 (version 1 chunks have 53), then (version 3) the
             optional sections present, uint8 (bit 0: teacher)
    frames   lz4 block of n_frames * 84 * 84 uint8, rows as above
    vectors  (T + 1, D) float32: the observation vector of each transition, then the last
             next-observation vector (D = 53, or 55 with env.gap_features)
    actions  (T, 2) float32
    rewards  (T,) float32
    flags    (T,) uint8: bit 0 terminated (no bootstrap), bit 1 truncated (time limit), bit 2
             the action came from a driver (`actors.warmup_actions`), not the policy (clear in
             chunks written before it existed)
    teacher  (T, 2) float32, where the sections byte says so: the privileged driver's action for
             each step's observation (`actors.teacher_labels`), whoever acted

Decoding checks the magic, the version, every size against the bytes present and the
decompressed frame size before touching the data; anything else is `ChunkError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.block
import numpy as np

from common.driving import ACTION_DIM, FRAME_SIZE, FRAME_STACK, VECTOR_DIM

MAGIC = b"AVT3"
VERSION = 3
READABLE = (1, 2, 3)
# magic, version, actor_id, episode_id, start_step, steps, n_frames, policy_version, frames_nbytes
HEADER = struct.Struct("<4sHIQIHHQI")
VECTOR_LEN = struct.Struct("<H")  # version 2 on
SECTIONS = struct.Struct("<B")  # version 3 on
TEACHER_SECTION = 1
FRAME_BYTES = FRAME_SIZE * FRAME_SIZE
MAX_STEPS = 4096  # far above any sane chunk; bounds what a decoder will allocate
TERMINATED, TRUNCATED, DRIVER = 1, 2, 4


class ChunkError(ValueError):
    """Bytes that are not a chunk this version can read; the message says why."""


@dataclass
class Chunk:
    """T consecutive transitions of one episode with the frames they need, each once."""

    actor_id: int
    episode_id: int
    start_step: int
    """Index k0 of the first transition within its episode."""
    policy_version: int
    frames: np.ndarray
    """(T + 1 + min(k0, 3), 84, 84) uint8: f_a .. f_{k0+T}."""
    vectors: np.ndarray
    """(T + 1, D) float32, D the vector observation's length."""
    actions: np.ndarray
    """(T, 2) float32."""
    rewards: np.ndarray
    """(T,) float32."""
    terminated: np.ndarray
    """(T,) bool."""
    truncated: np.ndarray
    """(T,) bool."""
    driver: np.ndarray | None = None
    """(T,) bool: the action came from a driver (warm-up or guided episode), not the policy; None: none did."""
    teacher: np.ndarray | None = None
    """(T, 2) float32: the privileged driver's action for each step's observation
    (`actors.teacher_labels`); None: not labelled."""

    @property
    def steps(self) -> int:
        return len(self.actions)

    def stack_rows(self) -> np.ndarray:
        """(T, 5) frame rows of each transition: [:, :4] observation, [:, 1:] next observation."""
        k = self.start_step + np.arange(self.steps)[:, None] + np.arange(-(FRAME_STACK - 1), 2)[None, :]
        return np.maximum(k, 0) - max(0, self.start_step - (FRAME_STACK - 1))


def expected_frames(start_step: int, steps: int) -> int:
    return steps + 1 + min(start_step, FRAME_STACK - 1)


def encode(chunk: Chunk) -> bytes:
    t = chunk.steps
    if not 1 <= t <= MAX_STEPS:
        raise ChunkError(f"a chunk holds 1..{MAX_STEPS} steps, got {t}")
    n = expected_frames(chunk.start_step, t)
    d = chunk.vectors.shape[-1]
    shapes = {
        "frames": ((n, FRAME_SIZE, FRAME_SIZE), np.uint8, chunk.frames),
        "vectors": ((t + 1, d), np.float32, chunk.vectors),
        "rewards": ((t,), np.float32, chunk.rewards),
    }
    if chunk.teacher is not None:
        shapes["teacher"] = ((t, ACTION_DIM), np.float32, chunk.teacher)
    for name, (shape, dtype, value) in shapes.items():
        if value.shape != shape or value.dtype != dtype:
            raise ChunkError(f"chunk {name} must be {shape} {np.dtype(dtype)}, got {value.shape} {value.dtype}")
    frames = lz4.block.compress(np.ascontiguousarray(chunk.frames).tobytes(), store_size=False)
    flags = chunk.terminated.astype(np.uint8) * TERMINATED | chunk.truncated.astype(np.uint8) * TRUNCATED
    if chunk.driver is not None:
        flags |= chunk.driver.astype(np.uint8) * DRIVER
    header = HEADER.pack(
        MAGIC, VERSION, chunk.actor_id, chunk.episode_id, chunk.start_step, t, n, chunk.policy_version, len(frames)
    )
    return b"".join([
        header,
        VECTOR_LEN.pack(d),
        SECTIONS.pack(0 if chunk.teacher is None else TEACHER_SECTION),
        frames,
        np.ascontiguousarray(chunk.vectors, np.float32).tobytes(),
        np.ascontiguousarray(chunk.actions, np.float32).reshape(t, ACTION_DIM).tobytes(),
        chunk.rewards.tobytes(),
        flags.astype(np.uint8).tobytes(),
        b"" if chunk.teacher is None else np.ascontiguousarray(chunk.teacher).tobytes(),
    ])


def decode(data: bytes, vector_dim: int | None = None) -> Chunk:
    """The chunk in `data`; with `vector_dim`, a chunk whose vectors have another length (actors
    and learner configured with different `env.gap_features` or `env.traffic_features`) is a `ChunkError` too."""
    if len(data) < HEADER.size:
        raise ChunkError(f"chunk is {len(data)} bytes, shorter than its {HEADER.size}-byte header")
    magic, version, actor_id, episode_id, start_step, t, n, policy_version, frames_nbytes = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ChunkError(f"not an av-td3 chunk (magic {magic!r})")
    if version not in READABLE:
        raise ChunkError(f"chunk schema version {version} is not supported (this build reads {READABLE})")
    head, d, sections = HEADER.size, VECTOR_DIM, 0
    extra = {1: 0, 2: VECTOR_LEN.size, 3: VECTOR_LEN.size + SECTIONS.size}[version]
    if len(data) < head + extra:
        raise ChunkError(f"chunk is {len(data)} bytes, shorter than its {head + extra}-byte header")
    if version >= 2:
        (d,) = VECTOR_LEN.unpack_from(data, head)
    if version >= 3:
        (sections,) = SECTIONS.unpack_from(data, head + VECTOR_LEN.size)
        if sections & ~TEACHER_SECTION:
            raise ChunkError(f"chunk names optional sections {sections:#x} this build does not know")
    head += extra
    if vector_dim is not None and d != vector_dim:
        raise ChunkError(f"chunk vectors have {d} features, this replay's {vector_dim}: actors and learner "
                         "must agree on env.gap_features and env.traffic_features")
    if not 1 <= t <= MAX_STEPS or n != expected_frames(start_step, t):
        raise ChunkError(f"chunk claims {t} steps and {n} frames from step {start_step}: inconsistent")
    sizes = [frames_nbytes, (t + 1) * d * 4, t * ACTION_DIM * 4, t * 4, t]
    if sections & TEACHER_SECTION:
        sizes.append(t * ACTION_DIM * 4)
    if len(data) != head + sum(sizes):
        raise ChunkError(f"chunk is {len(data)} bytes, its header implies {head + sum(sizes)}")
    offsets = np.cumsum([head, *sizes])
    try:
        raw = lz4.block.decompress(data[offsets[0]:offsets[1]], uncompressed_size=n * FRAME_BYTES)
    except lz4.block.LZ4BlockError as exc:
        raise ChunkError(f"chunk frames do not decompress: {exc}") from exc
    if len(raw) != n * FRAME_BYTES:
        raise ChunkError(f"chunk frames decompress to {len(raw)} bytes, expected {n * FRAME_BYTES}")

    def section(i: int, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=int(offsets[i])).reshape(shape)

    flags = section(4, np.uint8, (t,))
    return Chunk(
        actor_id=actor_id,
        episode_id=episode_id,
        start_step=start_step,
        policy_version=policy_version,
        frames=np.frombuffer(raw, np.uint8).reshape(n, FRAME_SIZE, FRAME_SIZE),
        vectors=section(1, np.float32, (t + 1, d)),
        actions=section(2, np.float32, (t, ACTION_DIM)),
        rewards=section(3, np.float32, (t,)),
        terminated=(flags & TERMINATED).astype(bool),
        truncated=(flags & TRUNCATED).astype(bool),
        driver=(flags & DRIVER).astype(bool),
        teacher=section(5, np.float32, (t, ACTION_DIM)) if sections & TEACHER_SECTION else None,
    )
