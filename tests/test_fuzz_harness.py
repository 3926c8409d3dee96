"""The atheris harness fuzz/fuzz_wire.py runs, and a bounded run finds nothing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_wire.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install atheris)")


def test_fuzz_harness_bounded_run(tmp_path: Path) -> None:
    start = time.monotonic()
    # cwd=tmp_path: libFuzzer writes crash-* reproducers to the working directory
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "-atheris_runs=20000", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 20000" in proc.stderr
    assert elapsed < 30, f"bounded fuzz run took {elapsed:.1f} s"
