"""``python -m dip_lightning <command>`` as a real subprocess, and the user-error message it ends with."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.tiny import subprocess_env

HANG_REPORT_S = 30  # after a timeout, how long the hung processes get to print their stacks


def run_process(
    cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a process group of its own, output captured as text.

    A run past ``timeout`` fails the test with the Python stacks of every process in the group (each gets
    SIGABRT with faulthandler on: DDP ranks, DataLoader workers), and none of them is left running; a plain
    ``subprocess.run`` kills only the first process and reports no stack, so a rare hang says nothing."""
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=HANG_REPORT_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)} ran past {timeout} s; its processes' stacks:\n{err[-12000:]}\n{out[-2000:]}"
        )
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # a rank or worker that outlived the first process
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(pgid, sig)


def run_command(*args: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dip_lightning *args`` in ``cwd`` (the repository) with one thread; output captured as text."""
    cmd = [sys.executable, "-m", "dip_lightning", *args]
    return run_process(cmd, cwd=cwd, env=subprocess_env(threads=1), timeout=timeout)


def user_error(result: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` message a command ended with (exit code 2, no traceback), from its first line on.

    Lines before it are start-up logging (LightningCLI's, when ``sample --experiment`` builds the module)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    first = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(first) == 1, result.stderr[-3000:]
    return "\n".join(lines[first[0] :])
