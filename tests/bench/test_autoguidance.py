"""bench/autoguidance.py end to end on a 4-step run (demo data, fit, CFG and autoguidance sweeps, table and plot), so
the measurement script cannot rot. It measures nothing here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_autoguidance_bench_smoke_run(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "autoguidance.py"), "--smoke", "--work", str(tmp_path)]
    cmd += ["--seeds", "0", "--cfg", "1.0", "2.0", "--ag", "2.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "results" / "autoguidance.md").read_text()
    rows = [
        line.split(" | ")[:2]
        for line in table.splitlines()
        if line.startswith("| cfg") or line.startswith("| autoguidance")
    ]
    assert sorted(rows) == [["| autoguidance", "1"], ["| autoguidance", "2"], ["| cfg", "1"], ["| cfg", "2"]]
    assert (tmp_path / "results" / "autoguidance.png").stat().st_size > 0
    assert "smoke run: nothing measured" in table
