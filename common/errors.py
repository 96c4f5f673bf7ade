"""Errors every role may raise to end a run cleanly: the CLI prints the message and exits 1."""


class ServiceUnavailable(RuntimeError):
    """A server the run needs (Redis, a CARLA server) did not answer before its deadline; the
    message names its address."""


class ActorsFailing(RuntimeError):
    """A rollout actor died too many times in a row: the cause is not transient."""
