"""Keeps rollout actors running: launches their reports, notices deaths, restarts with back-off.

An actor counts as dead when its process dies (`RayActorError`) or when its code raises (the
env or simulator is then in an unknown state): it is killed, and recreated after
`backoff * 2^(consecutive deaths - 1)` seconds (at most 60), while the others keep going. The
learner only ever polls with `ray.wait(timeout=0)`, so a dead actor cannot hang it. An actor that
dies `max_deaths` times in a row without one report between fails the run (`ActorsFailing`):
a simulator that cannot start, say, is not going to start on the eleventh try.

`resize(target)` makes the count elastic: it adds actors (new indices, or retired ones again with
a new incarnation) or retires the surplus, those waiting for a restart first, then those that
never reported (an actor Ray cannot place yet), then the highest indices. A retired actor's death
is no death: it stops nothing and is not restarted. `downtime_s` sums, over deaths, the time from
a death noticed to the restarted actor's first report.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray
from ray.exceptions import RayError

from common.errors import ActorsFailing

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
QUEUED = 2


def _cause(exc: Exception) -> str:
    """The last line of a Ray task failure: the original error, e.g. 'CarlaUnavailable: ...'."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


class ActorSupervisor:
    """`make(index, incarnation)` returns a new actor handle."""

    def __init__(self, make: Callable[[int, int], Any], count: int, backoff_s: float, max_deaths: int = 0) -> None:
        self.make = make
        self.backoff_s = backoff_s
        self.max_deaths = max_deaths
        self.incarnation: dict[int, int] = {}
        self.handles: dict[int, Any] = {}
        self.futures: dict[Any, int] = {}
        self.consecutive_deaths: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.reported: set[int] = set()  # live actors whose current incarnation has reported
        self.restarts = 0
        self.retired = 0
        self.down_since: dict[int, float] = {}  # dead actors: when their death was noticed
        self.downtime_s = 0.0
        self.resize(count)

    @property
    def alive(self) -> int:
        return len(self.handles)

    @property
    def target(self) -> int:
        """Actors wanted: live ones plus those waiting for a restart."""
        return len(self.handles) + len(self.restart_at)

    def resize(self, target: int) -> tuple[list[int], list[int]]:
        """Adds or retires actors until `target` are wanted; returns (added, retired) indices."""
        added, retired = [], []
        while self.target < target:
            index = min(set(range(self.target + 1)) - set(self.handles) - set(self.restart_at))
            self.incarnation[index] = self.incarnation[index] + 1 if index in self.incarnation else 0
            self.consecutive_deaths[index] = 0
            self.handles[index] = self.make(index, self.incarnation[index])
            added.append(index)
        while self.target > target:
            pending = sorted(self.restart_at) or sorted(set(self.handles) - self.reported) or sorted(self.handles)
            index = pending[-1]
            self.restart_at.pop(index, None)
            self.down_since.pop(index, None)
            self._drop(index)
            self.retired += 1
            retired.append(index)
        if added or retired:
            log.info("rollout actors: %d wanted (added %s, retired %s)", target, added, retired)
        return added, retired

    def launch(self, index: int, *args: Any) -> None:
        self.futures[self.handles[index].run.remote(*args)] = index

    def idle(self) -> list[int]:
        """Live actors with fewer than `QUEUED` reports in flight (one queued behind the running
        one keeps an actor stepping while the learner is busy updating)."""
        in_flight = list(self.futures.values())
        return [i for i in self.handles for _ in range(QUEUED - in_flight.count(i))]

    def collect(self) -> list[tuple[int, dict[str, Any]]]:
        """Reports that are ready now; deaths are handled on the way."""
        if not self.futures:
            return []
        ready, _ = ray.wait(list(self.futures), num_returns=len(self.futures), timeout=0)
        reports = []
        for future in ready:
            index = self.futures.pop(future, None)
            if index is None:  # a queued report of an actor buried a moment ago
                continue
            try:
                reports.append((index, ray.get(future)))
                self.consecutive_deaths[index] = 0
                if index in self.down_since:  # back in service: its first report since the death
                    self.downtime_s += time.monotonic() - self.down_since.pop(index)
                self.reported.add(index)
            except RayError as exc:
                self._bury(index, exc)
        return reports

    def _drop(self, index: int) -> None:
        """Kills actor `index` (if it lives) and forgets its reports in flight."""
        handle = self.handles.pop(index, None)
        self.reported.discard(index)
        for future in [f for f, i in self.futures.items() if i == index]:
            del self.futures[future]  # a queued report dies with the actor
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def _bury(self, index: int, exc: Exception) -> None:
        self._drop(index)
        self.down_since.setdefault(index, time.monotonic())
        self.consecutive_deaths[index] += 1
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self.max_deaths and self.consecutive_deaths[index] >= self.max_deaths:
            raise ActorsFailing(f"rollout actor {index} died {self.consecutive_deaths[index]} times in a row "
                                f"(actors.max_consecutive_deaths); the last time: {_cause(exc)}")
        delay = min(self.backoff_s * 2 ** (self.consecutive_deaths[index] - 1), MAX_BACKOFF_S)
        self.restart_at[index] = time.monotonic() + delay
        log.warning("rollout actor %d died (%s); restarting in %.1fs", index, first_line[:300], delay)

    def restart_due(self) -> list[int]:
        """Recreates the actors whose back-off has passed; returns their indices."""
        now = time.monotonic()
        due = [i for i, t in self.restart_at.items() if t <= now]
        for index in due:
            del self.restart_at[index]
            self.incarnation[index] += 1
            self.handles[index] = self.make(index, self.incarnation[index])
            self.restarts += 1
        return due

    def shutdown(self) -> None:
        for handle in self.handles.values():
            ray.kill(handle, no_restart=True)
        self.handles.clear()
        self.futures.clear()
        self.restart_at.clear()
