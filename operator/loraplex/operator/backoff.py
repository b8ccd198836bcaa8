"""Backoff: the one formula of every wait before a retry. Used for an adapter or an unreachable
engine on a pod (fleet.py), the API server's transient trouble (kube.py) and a failed pass of a
base (handlers.py).
"""
from __future__ import annotations

import random
from typing import Callable


def exponential(attempt: int, base: float, cap: float) -> float:
    """`base * 2^(attempt-1)` seconds, at most `cap`: attempt 1 waits `base`."""
    return min(base * (2 ** max(attempt - 1, 0)), cap)


def jittered(delay: float, rand: Callable[[], float] = random.random) -> float:
    """Between half and all of `delay`, so that many clients do not retry in step."""
    return delay * (0.5 + rand() / 2)
