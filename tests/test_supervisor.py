"""The actor supervisor's elastic count, without Ray: handles are plain objects, kills are recorded."""

import pytest

import learner.supervisor as supervisor
from learner.supervisor import ActorSupervisor


@pytest.fixture
def killed(monkeypatch):
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(supervisor.ray, "kill", lambda handle, no_restart: calls.append(handle))
    return calls


def make(index: int, incarnation: int) -> tuple[int, int]:
    return index, incarnation


def test_resize_adds_the_lowest_free_indices_and_retires_the_highest(killed):
    sup = ActorSupervisor(make, 2, backoff_s=1.0)
    assert sorted(sup.handles) == [0, 1]
    sup.reported.update({0, 1})
    assert sup.resize(4) == ([2, 3], [])
    sup.reported.update({2, 3})
    assert sup.resize(2) == ([], [3, 2])
    assert killed == [(3, 0), (2, 0)] and sup.retired == 2
    # Back again: the same indices, each with a new incarnation (new seeds).
    assert sup.resize(3) == ([2], [])
    assert sup.handles[2] == (2, 1)


def test_resize_retires_actors_waiting_for_a_restart_then_those_never_placed(killed):
    sup = ActorSupervisor(make, 4, backoff_s=1.0)
    sup.reported.update({0, 2, 3})  # actor 1 never reported: Ray could not place it
    sup._bury(3, RuntimeError("node died"))  # actor 3's node left: a restart is pending
    assert sup.target == 4 and sup.alive == 3
    assert sup.resize(2) == ([], [3, 1])
    assert sup.restart_at == {} and sorted(sup.handles) == [0, 2]
    assert sup.restart_due() == []  # a retired actor is not restarted
