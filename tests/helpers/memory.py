"""Peak memory of a real process: ``VmHWM`` of ``/proc/self/status`` read as the process ends.

Not ``getrusage``: on Linux ``ru_maxrss`` survives ``execve``, so a child forked from a large test process reports
the parent's size.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO
from tests.helpers.tiny import subprocess_env

_MARK = "peak-rss-kb:"
_REPORT = f"""
import atexit, sys
def _report():
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    sys.stderr.write("\\n{_MARK}" + peak + "\\n")
atexit.register(_report)
"""


def run_measured(code: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``code`` in a fresh Python (repository importable, one thread); returns the result and its peak resident
    memory in MB."""
    result = subprocess.run(
        [sys.executable, "-c", _REPORT + code],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    peak = [line for line in result.stderr.splitlines() if line.startswith(_MARK)]
    assert peak, result.stderr[-3000:]
    return result, int(peak[-1][len(_MARK) :]) / 1024


def run_command_measured(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m dip_lightning *args`` with its peak resident memory in MB (see :func:`run_measured`)."""
    code = (
        f"import runpy\nsys.argv = ['dip_lightning', *{list(args)!r}]\n"
        "runpy.run_module('dip_lightning', run_name='__main__')"
    )
    return run_measured(code, timeout)
