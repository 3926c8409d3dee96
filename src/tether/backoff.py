"""How long to wait before dialling again: one rule for every part of tether that
re-dials (a mesh's peers, an edge's gateway).

The wait doubles from 20 ms up to a cap, less a random part of up to half: a peer
that is back is found within tens of milliseconds, one that stays away costs one
attempt per cap, and a fleet that lost the same peer at the same moment does not dial
it in step."""

from __future__ import annotations

import random
from typing import Final

__all__ = ["FIRST", "retry_delay"]

FIRST: Final = 0.02
"""Seconds before the first attempt again."""


def retry_delay(attempt: int, cap: float) -> float:
    """Seconds to wait before attempt number `attempt` (0 for the first retry): FIRST
    doubled `attempt` times, never above `cap`, times a random factor in [0.5, 1]."""
    return min(cap, FIRST * 2.0 ** min(attempt, 30)) * random.uniform(0.5, 1.0)
