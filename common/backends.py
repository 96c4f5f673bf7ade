"""The backend registry: what each simulator behind the env contract declares about itself.

A backend's own module declares a `BackendSpec` and registers it; everything else (the env
factory, the baseline, the config display, Ray's CPU reservations, the metrics of both modes)
asks the registry instead of branching on the backend's name. The built-in backends register
when `actors.envs` is imported; a backend of your own registers in a module named by
`env.backend_module`, which every process that makes envs imports (Ray workers included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

Aggregation = Literal["sum", "mean"]
METRIC_PREFIX = "actors/"
_AGGREGATE: dict[str, Callable[[list[float]], float]] = {"sum": lambda v: float(sum(v)), "mean": lambda v: float(np.mean(v))}


def _nothing_to_check(cfg: Any) -> None:
    """A backend with nothing to check before it is built."""


def _no_server(cfg: Any) -> float:
    """A backend whose simulator runs inside the env's own process."""
    return 0.0


@dataclass(frozen=True)
class BackendSpec:
    """One simulator backend. Every callable takes the run's `Config`."""

    name: str
    """The value of env.backend that selects it."""
    make: Callable[[Any, int, bool], Any]
    """(cfg, env slot, training) -> the `DrivingBackend` of one env."""
    step_seconds: Callable[[Any], float]
    """Simulated seconds per env step."""
    max_steer_rad: float
    """Front-wheel angle at steer = 1, which the baseline's pure pursuit needs."""
    config_section: str | None = None
    """Dotted path of the config section only this backend reads (e.g. "env.embedded"): left out
    of the config text and HPARAMS of runs on another backend."""
    metrics: dict[str, Aggregation] = field(default_factory=dict)
    """Its health metrics, tag -> how the envs of a run combine: the tag is "actors/" + the key its
    `metrics()` reports; descriptions live in common/tags.py with every other tag."""
    check: Callable[[Any], None] = _nothing_to_check
    """Raises `ConfigError` at start, before anything is launched, when it cannot be built."""
    server_cpus: Callable[[Any], float] = _no_server
    """CPUs each env's simulator server needs beside its actor (Ray reserves them)."""


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    """Adds `spec` (again, when its module is reloaded) and returns it."""
    if not spec.name or any(t for t in spec.metrics if not t.startswith(METRIC_PREFIX)):
        raise ValueError(f"backend '{spec.name}': a name is needed, and metric tags start with '{METRIC_PREFIX}'")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, BackendSpec]:
    """The backends registered in this process, by name."""
    return dict(_REGISTRY)


def aggregate(spec: BackendSpec, reports: list[dict[str, float]]) -> dict[str, float]:
    """The backend's metrics as TensorBoard tags, combined over the `metrics()` reports of a
    run's envs (one in serial mode); empty reports are an env that reported nothing yet."""
    reports = [r for r in reports if r]
    if not reports:
        return {}
    return {tag: _AGGREGATE[how]([r[tag[len(METRIC_PREFIX):]] for r in reports]) for tag, how in spec.metrics.items()}
