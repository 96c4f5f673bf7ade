"""docker-compose.yml's topology, rehearsed as host processes (tests/rehearse.py, `make rehearse`):
the real entrypoints with compose's environment join, scale, refuse bad workers and resume."""

from tests.rehearse import compose_environment, rehearse


def test_compose_environment_resolves_as_compose_does():
    service = {"environment": {"A": "${A:?set A}", "B": "${B:-two}", "C": "x$${C}", "D": "${D}"}}
    assert compose_environment(service, {"A": "1", "D": ""}) == {"A": "1", "B": "two", "C": "x${C}", "D": ""}
    try:
        compose_environment(service, {})
    except ValueError as exc:
        assert "set A" in str(exc)
    else:
        raise AssertionError("a missing ${A:?} must refuse")


def test_the_compose_topology_rehearsed(tmp_path):
    timings = rehearse(tmp_path, say=print)
    assert set(timings) >= {"head healthy", "workers healthy", "actors", "transitions", "scale up", "scale down",
                            "resume", "rejoin"}
