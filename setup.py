"""Build hook: tether is pure Python; with TETHER_COMPILE=1 the relay's data path is
compiled with mypyc (the same source, type-checked, turned into C extension modules).

    TETHER_COMPILE=1 pip install .        # or `make compiled` (into build/compiled)

Why: a relay hop's work per read is a few dozen Python calls (decode a frame, step the
flow's state, splice, encode, write), and on the close path every one of them is
latency. Compiled (a prototype, measured in one session), a relayed connection used about
10 % less CPU and the close cascade was 15-20 % faster (docs/benchmarks.md).

What is compiled: the modules a relayed byte or stream end passes through, except
`wire` (mypyc does not compile its frame dataclasses' class variables) and `flow` (an
async generator). Everything else stays interpreted; the two kinds mix freely. Without
the variable, or where mypyc is missing, the build is pure Python as before.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "aio", "bridge", "coalesce", "events", "flowstate", "gateway", "heap", "heldreads",
    "inflight", "link", "liveness", "node", "readbuf", "relay", "sendqueue", "splice",
]


def ext_modules() -> list[object]:
    if os.environ.get("TETHER_COMPILE", "") not in ("1", "true", "yes"):
        return []
    from mypyc.build import mypycify

    # The build environment has mypy but not the runtime dependencies (uvloop,
    # prometheus_client): their types are Any to the compiled code, checked at run time.
    return list(mypycify([f"src/tether/{m}.py" for m in COMPILED]
                         + ["--ignore-missing-imports"],
                         opt_level=os.environ.get("TETHER_COMPILE_OPT", "3")))


setup(ext_modules=ext_modules())
