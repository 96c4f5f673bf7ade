"""Policy weights between the learner and the actors: versioned safetensors bytes (no pickle),
published once into Ray's object store and fetched by every actor (Acme's VariableClient)."""

from __future__ import annotations

from typing import Any

from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from common.networks import Policy


def policy_to_bytes(policy: Policy) -> bytes:
    return save_bytes({k: v.detach().float().cpu().contiguous() for k, v in policy.state_dict().items()})


def load_policy_bytes(policy: Policy, data: bytes) -> None:
    policy.load_state_dict(load_bytes(data))


class WeightStore:
    """Holds the newest (version, reference to the weight bytes). Run as a Ray actor: the learner
    puts the bytes into the object store once and registers the reference here; actors ask for
    anything newer than what they have."""

    def __init__(self) -> None:
        self.version = -1
        self.ref: list[Any] = []

    def publish(self, version: int, ref: list[Any]) -> None:
        # `ref` arrives wrapped in a list so Ray passes the reference instead of resolving it.
        if version > self.version:
            self.version, self.ref = version, ref

    def newer_than(self, version: int) -> tuple[int, list[Any]] | None:
        return (self.version, self.ref) if self.version > version else None


class VariableClient:
    """Actor side: asks the store for newer weights without ever blocking the env loop."""

    def __init__(self, store: Any, policy: Policy) -> None:
        self.store = store
        self.policy = policy
        self.version = -1
        self.fetches = 0
        self._pending: Any = None

    def update(self, wait: bool = False) -> bool:
        """Applies newer weights if a previous request has answered; sends a new request. True when updated."""
        import ray

        updated = False
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=None if wait else 0)
            if ready:
                answer = ray.get(self._pending)
                self._pending = None
                if answer is not None:
                    version, (ref,) = answer
                    load_policy_bytes(self.policy, ray.get(ref))
                    self.version = version
                    self.fetches += 1
                    updated = True
        if self._pending is None:
            self._pending = self.store.newer_than.remote(self.version)
        return updated
