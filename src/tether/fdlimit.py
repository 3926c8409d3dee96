"""A process's open-file limit, and the connection limit a server keeps below it.

A server that reaches the kernel's limit does not hear of it: libuv (under uvloop),
finding no file for an accept (EMFILE), accepts and closes every connection waiting in
the backlog, so that its loop does not spin on a listening socket that stays readable.
Those clients read a plain EOF, an empty answer that looks clean, and nothing is
logged or counted. So each server that accepts many connections (an agent, a hub)
keeps a limit of its own below the kernel's (`default_max_connections`) and resets,
logs and counts what is over it (`tether.floodlog.FloodLog` for the lines).
"""

from __future__ import annotations

import contextlib
import resource
from typing import Final, Literal

__all__ = ["FD_RESERVE", "default_max_connections", "resolve_limit", "take_hard_limit"]

FD_RESERVE: Final = 128
"""Open files a server keeps for itself below its open-file limit: its listeners, links
and event loop, an admin endpoint's at most 64 connections."""


def default_max_connections() -> int | None:
    """A server's connection limit when none is given: the process's open-file limit
    (`RLIMIT_NOFILE`, soft) less `FD_RESERVE`, or half of it when that limit is
    `FD_RESERVE` twice or less; None if there is no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return soft - FD_RESERVE if soft > 2 * FD_RESERVE else max(1, soft // 2)


def resolve_limit(given: int | Literal["default"] | None, name: str) -> int | None:
    """A server's `max_connections` or `max_links` as given: "default" is
    `default_max_connections()`, None no limit of its own, else 1 or more (`ValueError`
    naming `name` otherwise)."""
    if given == "default":
        return default_max_connections()
    if given is not None and not given >= 1:
        raise ValueError(f"{name} must be 1 or more, not {given!r}")
    return given


def take_hard_limit() -> None:
    """Raise the soft open-file limit to the hard one, as Go's runtime does for every
    program: the soft limit is often 1024 where the hard one is far higher. For a
    daemon's start (`tether.cli`), before any default limit is read."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or hard == resource.RLIM_INFINITY or soft >= hard:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

