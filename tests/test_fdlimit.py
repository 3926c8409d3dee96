"""tether.fdlimit in processes of their own, started with the open-file limits given
(`prlimit`): a server's default connection limit, and the soft limit raised."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _in_process(nofile: str, code: str) -> str:
    done = subprocess.run(["prlimit", f"--nofile={nofile}", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize(("nofile", "limit"), [(20000, 19872), (257, 129), (256, 128),
                                               (100, 50)])
def test_default_max_connections_follows_the_open_file_limit(nofile: int, limit: int) -> None:
    """The open-file limit less 128 (`FD_RESERVE`), or half of it up to 256."""
    got = _in_process(f"{nofile}:{nofile}", "from tether.fdlimit import "
                      "default_max_connections as d; print(d())")
    assert got == str(limit)


def test_take_hard_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    got = _in_process("300:1000", "import resource; from tether.fdlimit import "
                      "take_hard_limit, default_max_connections as d; take_hard_limit(); "
                      "print(resource.getrlimit(resource.RLIMIT_NOFILE), d())")
    assert got == "(1000, 1000) 872"


def test_take_hard_limit_leaves_a_soft_limit_at_the_hard_one() -> None:
    got = _in_process("500:500", "import resource; from tether.fdlimit import "
                      "take_hard_limit; take_hard_limit(); "
                      "print(resource.getrlimit(resource.RLIMIT_NOFILE))")
    assert got == "(500, 500)"

