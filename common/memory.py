"""Process memory as a long run should read it: live memory, not what the C allocator keeps."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; absent on macOS and musl
    except (AttributeError, OSError):
        return None


def release_free_heap() -> float:
    """Hands the malloc heap's free pages back to the OS (glibc's `malloc_trim`); returns the MB
    released, 0 where the C library has no such call. Why: a learner update or an evaluation with
    a video allocates and frees hundreds of MB, and glibc keeps much of what they free (one trim
    returned 250 MB of a 740 MB update loop), so the RSS swings by tens of MB between samples and
    a slow leak cannot be told from it; trimmed first, the RSS is live memory."""
    import psutil

    trim = _malloc_trim()
    if trim is None:
        return 0.0
    before = psutil.Process().memory_info().rss
    trim(0)
    return max(before - psutil.Process().memory_info().rss, 0) / 2**20
