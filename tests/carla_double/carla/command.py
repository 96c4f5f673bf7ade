"""Double of `carla.command`: the batch commands the backend sends."""

from __future__ import annotations

from typing import Any

FutureActor = 0
"""Stands for the actor the previous command of a chain spawned (an int in the real module too)."""


class Response:
    actor_id: int
    error: str

    def __init__(self, actor_id: int, error: str) -> None:
        self.actor_id = actor_id
        self.error = error


class SpawnActor:
    def __init__(self, blueprint: Any, transform: Any) -> None:
        self._blueprint = blueprint
        self._transform = transform
        self._then: list[Any] = []

    def then(self, command: Any) -> "SpawnActor":
        self._then.append(command)
        return self


class SetAutopilot:
    def __init__(self, actor: Any, enabled: bool, port: int = 8000) -> None:
        self._actor = actor
        self._enabled = enabled
        self._port = port


class DestroyActor:
    def __init__(self, actor: Any) -> None:
        self._actor = actor
