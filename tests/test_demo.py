"""`python -m tether.demo` (what `make run` runs) works and shows what it promises."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def output() -> str:
    done = subprocess.run([sys.executable, "-m", "tether.demo"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


@pytest.mark.parametrize("line", [
    "client -> server  HELLO name='client'",
    "server -> client  HELLO name='server'",
    "client -> server  OPEN stream=1 service='oecho' liveness_ms=1000",
    "server -> client  OPEN_OK stream=1",
    "client -> server  DATA stream=1 data=b'Client says hi!'",
    "server -> client  DATA stream=1 data=b'Client says hi!'",
    "client  stream 1: OPEN -> LOCAL_FIN",
    "client -> server  FIN stream=1",
    "server  stream 1: OPEN -> REMOTE_FIN",
    "server -> client  CLOSE stream=1",
    "server  event FlowEnded stream=1 state=CLOSED",
    "client  event FlowEnded stream=1 state=CLOSED",
    "client -> server  OPEN stream=3 service='oecho'",
    "client -> server  KEEPALIVE stream=3",
    "client  event FlowEnded stream=3 state=DOWN code=FLOW_PEER "
    "reason='down: unresponsive peer'",
    "client  stream 3: OPEN -> DOWN",
    "client -> server  RESET stream=3 code=FLOW_PEER reason='unresponsive peer'",
    "server  event FlowEnded stream=3 state=DOWN",
    "== done",
])
def test_demo_shows(output: str, line: str) -> None:
    assert line in output


def test_demo_order_and_virtual_time(output: str) -> None:
    lines = output.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    steps = ["HELLO", "OPEN stream=1", "DATA stream=1", "FIN stream=1", "CLOSE stream=1",
             "OPEN stream=3", "KEEPALIVE stream=3", "state=DOWN", "== done"]
    positions = [first(step) for step in steps]
    assert positions == sorted(positions)
    # the liveness timeout is 1 s of virtual time: keepalives every quarter, DOWN at 1 s
    keepalives = [line for line in lines if "client -> server  KEEPALIVE" in line]
    assert [line[:9] for line in keepalives] == ["[t=0.250]", "[t=0.500]", "[t=0.750]"]
    assert lines[first("client  event FlowEnded stream=3")].startswith("[t=1.000]")
