"""`make run`'s relay demo runs end to end: real processes, a page through the tunnel."""

from __future__ import annotations

import subprocess
import sys


def test_relay_demo_fetches_a_page_and_every_flow_ends() -> None:
    out = subprocess.run([sys.executable, "-m", "tether.relaydemo"], capture_output=True,
                         text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "got HTTP 200, 50030 bytes" in text
    for line in ("flow 1@gw1 spliced service=web agent#1 -> connector#2",
                 "flow 1@agent ended: CLOSED", "flow 1@connector ended: CLOSED",
                 "flow 2@agent ended: CLOSED", "flow 2@connector ended: CLOSED",
                 '"flows": 0'):
        assert line in text, f"missing {line!r} in:\n{text}"
    assert text.rstrip().endswith("done")
