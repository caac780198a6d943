"""``python -m dip_lightning <command>`` as a real subprocess, and the user-error message it ends with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.tiny import subprocess_env


def run_command(*args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m dip_lightning *args`` in ``cwd`` (the repository) with one thread; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "dip_lightning", *args],
        cwd=cwd,
        env=subprocess_env(threads=1),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def user_error(result: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` message a command ended with (exit code 2, no traceback), from its first line on.

    Lines before it are start-up logging (LightningCLI's, when ``sample --experiment`` builds the module)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(first) == 1, result.stderr[-3000:]
    return "\n".join(lines[first[0] :])
