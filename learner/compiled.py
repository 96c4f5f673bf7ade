"""`learner.compile`: torch.compile around the TD3 update's graphs, with an eager fallback.

The update (learner/td3.py) stays one eager function that reads top to bottom; this wraps the
methods that hold its compute (the augmentation, the critic CNN, the critic and actor losses,
whose backward passes AOTAutograd compiles with them) and the guard's snapshot copies. The
optimizer steps are fused Adam kernels already, and the schedule (which update trains the actor)
stays Python on host counters, so nothing recompiles as the update count grows. A wrapper whose
compilation (or capture) fails logs the reason once and runs its function eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from learner.td3 import TD3

log = logging.getLogger(__name__)
COMPILED_METHODS = ("augment", "encode", "critic_loss", "actor_loss")


class Compiled:
    """`fn` under torch.compile(mode=`mode`); after a failure, `fn` itself."""

    def __init__(self, fn: Callable[..., Any], mode: str, name: str) -> None:
        self.fn = fn
        self.mode = mode
        self.name = name
        self.compiled = torch.compile(fn, mode=mode)
        self.failure: str | None = None
        """Why compilation failed (the exception's first line), None while it works."""

    def __call__(self, *args: Any) -> Any:
        if self.failure is None:
            try:
                # The backward graph is compiled with the forward one, so that its failure is
                # caught here too and not in a later loss.backward().
                with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                    return self.compiled(*args)
            except Exception as exc:  # any failure of the compiler stack: the eager function still works
                self.failure = reason(exc)
                log.warning("learner.compile=%s: compiling %s failed, it runs eagerly from now on (%s)",
                            self.mode, self.name, self.failure)
        return self.fn(*args)


def reason(exc: BaseException) -> str:
    """The exception's type, and the first line of what caused it (a compiler's own exception
    wraps the backend's, whose message says what went wrong)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    lines = str(root).strip().splitlines()
    cause = f"{type(root).__name__}: {lines[0] if lines else ''}"
    return cause if root is exc else f"{type(exc).__name__} ({cause})"


def compile_update(agent: TD3, mode: str) -> list[Compiled]:
    """Wraps `agent`'s compute methods and its guard's copies for `mode` (none: nothing)."""
    if mode == "none":
        return []
    wrappers = [Compiled(getattr(agent, name), mode, name) for name in COMPILED_METHODS]
    for name, wrapper in zip(COMPILED_METHODS, wrappers):
        setattr(agent, name, wrapper)
    # In-place copies into their inputs: CUDA graphs would skip them, so the default mode.
    agent.guard.where_copy_ = Compiled(agent.guard.where_copy_, "default", "the guard's snapshot copy")
    return [*wrappers, agent.guard.where_copy_]


def failures(agent: TD3) -> dict[str, str]:
    """What fell back to eager, and why."""
    return {w.name: w.failure for w in agent.compiled if w.failure is not None}
