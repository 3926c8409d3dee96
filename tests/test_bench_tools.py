"""The benchmarks' own tools work: they are not run in the suite for their numbers (no
timed assertion), but a benchmark that cannot run, or reads its children's output
wrong, goes unnoticed until someone needs its numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_READ_WHILE_WRITTEN = """
import json, sys
sys.path.insert(0, "bench")
from benchlib import Proc
proc = Proc("writer", [sys.executable, "-c",
                       "for i in range(20000): print(f'line {i:06d} ' + 'x' * 50)"])
torn = 0
while proc.popen.poll() is None:
    torn += sum(not line.startswith("line ") for line in proc.lines)
proc.popen.wait()
final = proc.lines
print(json.dumps({"torn": torn, "lines": len(final),
                  "in_order": final == [f"line {i:06d} " + "x" * 50 for i in range(20000)]}))
"""


def test_a_childs_output_is_whole_while_the_benchmark_reads_it() -> None:
    """`benchlib.Proc` reads a child's output file while the child writes it: every
    line whole and in order. (The child wrote through the same open file whose offset
    each read moved to 0: without O_APPEND its lines overwrote the file's start, and a
    full bench/relay.py run failed reading "op ports" for "hop ports".)"""
    done = subprocess.run([sys.executable, "-c", _READ_WHILE_WRITTEN], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"torn": 0, "lines": 20000, "in_order": True}


def test_the_relay_benchmark_runs_and_reports_every_path() -> None:
    """A short close run of bench/relay.py through the chain, tether and `--against`
    (tether from a source tree given: here this one) ends cleanly and reports one line
    per path and the targets. Its numbers are not looked at."""
    done = subprocess.run(
        [sys.executable, "bench/relay.py", "--only", "close", "--paths", "chain3,tether",
         "--against", "src", "--closes", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    closes = {d["name"]: d for d in lines if d["bench"] == "close"}
    assert set(closes) == {"chain3", "tether", "against"}, lines
    assert all(d["n"] == 5 and d["value"] > 0 for d in closes.values()), closes
    assert {d["name"] for d in lines if d["bench"] == "target"} >= {
        "close p50 tether/chain3", "close p99 tether/chain3"}, lines
