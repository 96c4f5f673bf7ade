"""The learner step shared by the serial and distributed runs (Acme's `Learner.step`)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from common.batch import Batch
from common.config import Config
from common.driving import ACTION_NAMES
from common.metrics import MetricLogger
from common.tags import reference_lines
from learner.device_frames import DeviceFrames
from learner.td3 import TD3, Metrics, read_back
from replay_server.ring import FrameRing
from replay_server.sampler import RateLimiter, make_sampler

log = logging.getLogger(__name__)


class Learner:
    """Samples batches from the ring under the rate limiter and updates the agent."""

    def __init__(self, agent: TD3, ring: FrameRing, cfg: Config, logger: MetricLogger, rng: np.random.Generator) -> None:
        r = cfg.replay
        self.agent = agent
        self.ring = ring
        self.cfg = cfg
        self.logger = logger
        self.rng = rng
        self.limiter = RateLimiter(max(r.min_size_to_sample, cfg.td3.batch_size), r.samples_per_insert, r.error_buffer,
                                   make_sampler(r, agent.updates))
        self._pending: tuple[np.ndarray, torch.Tensor] | None = None
        """The last batch's slots and |TD errors| (on the device), for a prioritized sampler."""
        self.interval = 10 if cfg.logging.debug else cfg.logging.log_interval
        self.device_frames = DeviceFrames(ring, agent.device) if cfg.learner.replay_on_device else None
        self._last_log = time.monotonic()
        self._guard_seen = (0, 0)
        """The guard's (skipped, restored) totals at the last log."""
        self.step_seconds = 0.0
        """Wall time spent in `step` (sampling, update, its logging) since the owner last reset it."""

    def ready(self, env_step: int) -> bool:
        """Learning has started and the rate limiter lets the learner sample."""
        return env_step > self.cfg.td3.learning_starts and self.limiter.can_sample(
            len(self.ring), self.ring.head, self.cfg.td3.batch_size
        )

    def step(self, env_step: int) -> Metrics:
        start = time.perf_counter()
        try:
            return self._step(env_step)
        finally:
            self.step_seconds += time.perf_counter() - start

    def _step(self, env_step: int) -> Metrics:
        t = self.cfg.td3
        frames = self.device_frames
        arrays = self.limiter.sample(self.ring, t.batch_size, self.rng, t.n_step, t.gamma, images=frames is None)
        batch = Batch.from_numpy(arrays, self.agent.device) if frames is None else frames.batch(arrays)
        metrics = self.agent.update(batch)
        if self.limiter.sampler.uses_priorities:
            self._hand_back_priorities(batch.indices)
        if self._due(metrics):
            self._log(metrics, env_step)
        return metrics

    def _hand_back_priorities(self, indices: np.ndarray) -> None:
        """The previous update's TD errors to the sampler, read back now that this update is
        queued behind it: the device keeps working while the host updates the priorities (one
        update late; the sampler drops those of slots refilled since). A copy: the next update
        may reuse a compiled graph's output memory (CUDA graphs)."""
        pending, self._pending = self._pending, (indices, self.agent.last_td_error.clone())
        if pending is not None:
            slots, td_error = pending
            self.limiter.sampler.update_priorities(slots, td_error.float().cpu().numpy())

    def _due(self, metrics: Metrics) -> bool:
        """Every `log_interval` updates, or `log_seconds` after the last log (a slow device still
        draws curves); a late log waits for an actor update, so the actor's panels get the point too."""
        if self.agent.updates % self.interval == 0:
            return True
        late = time.monotonic() - self._last_log >= self.cfg.logging.log_seconds
        warming_up = self.agent.updates <= self.cfg.td3.critic_warmup_updates
        return late and ("train/actor_loss" in metrics or warming_up)

    def budget_step(self, env_step: int) -> int:
        """The env step whose data budget the latest update spends: learning_starts + updates /
        updates_per_step, at most `env_step`. The learner's x-axis: in step with the env steps when
        the learner keeps up (serial mode), and still a curve, not a stack of points at one step,
        when actors run ahead of a slow learner and wait for it (distributed mode on a CPU)."""
        ups = self.cfg.learner.updates_per_step  # > 0 (validated)
        return min(env_step, self.cfg.td3.learning_starts + round(self.agent.updates / ups))

    def _log(self, metrics: Metrics, env_step: int) -> None:
        """The update's metrics, read back in one transfer (the only host sync of the learner's
        step). The alerts count what the guard saw since the last log: updates skipped for a
        non-finite loss or gradient, and restores, however many updates apart the logs are."""
        self._last_log = time.monotonic()
        env_step = self.budget_step(env_step)
        guard = self.agent.guard
        host = read_back({**metrics, "skipped": guard.skipped, "restored": guard.restored})
        totals = int(host.pop("skipped")), int(host.pop("restored"))
        stepped = not host["alerts/nonfinite_loss"]
        if not stepped:  # its losses and actions are no values to draw
            host = {}
        host["alerts/nonfinite_loss"] = totals[0] - self._guard_seen[0]
        host["alerts/weights_restored"] = totals[1] - self._guard_seen[1]
        self._guard_seen = totals
        sampler = self.limiter.sampler
        self.logger.log({**host, "train/updates": self.agent.updates, **reference_lines(), **sampler.metrics()}, env_step)
        for tag, values in sampler.histograms().items():
            self.logger.histogram(tag, values, env_step)
        if stepped and self.agent.last_actions is not None and "train/actor_loss" in metrics:
            for i, name in enumerate(ACTION_NAMES):
                self.logger.histogram(f"debug/action_{name}", self.agent.last_actions[:, i].cpu(), env_step)
        if stepped and self.agent.last_q is not None:
            self.logger.histogram("debug/q", self.agent.last_q.float().cpu(), env_step)
        if self.cfg.logging.debug:
            log.debug("update %d: %s", self.agent.updates,
                      {k: round(v, 4) for k, v in host.items() if k.startswith(("train/", "debug/cnn"))})


def rss_and_gpu_metrics(device: torch.device) -> dict[str, float]:
    """Learner process memory: RSS, and GPU memory on CUDA."""
    import psutil

    out = {"perf/learner_rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        out["perf/gpu_memory_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
        out["perf/gpu_memory_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out
