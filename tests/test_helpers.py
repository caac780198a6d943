"""The test helpers that other tests trust to report a failure: a hung subprocess must say where it hangs."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers.commands import run_process

# A parent that starts a child (as a DDP launcher starts rank 1); both then wait forever in named functions.
HANGING_PAIR = textwrap.dedent(
    """
    import subprocess, sys, time

    def child_waits_forever():
        print("child", flush=True)
        time.sleep(3600)

    def parent_waits_forever(child):
        print("child pid", child.pid, flush=True)
        time.sleep(3600)

    if sys.argv[1:] == ["child"]:
        child_waits_forever()
    else:
        parent_waits_forever(subprocess.Popen([sys.executable, __file__, "child"]))
    """
)


def test_a_hung_process_group_reports_every_process_stack_and_leaves_nothing_running(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_PAIR)
    with pytest.raises(pytest.fail.Exception) as failed:
        run_process([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ), timeout=5)
    report = str(failed.value)
    assert "ran past 5 s" in report
    assert "parent_waits_forever" in report and "child_waits_forever" in report, report
    child_pid = int(report.split("child pid ")[1].split()[0])
    deadline = time.monotonic() + 10  # a killed process takes a moment to exit
    while _running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child_pid)  # the child, a process the first one started, is gone too


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (an exited process that nobody reaped yet, state Z, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_process_that_ends_gives_its_exit_code_and_output(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('out'); sys.stderr.write('err'); sys.exit(3)"]
    result = run_process(cmd, cwd=tmp_path, env=dict(os.environ), timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err")
