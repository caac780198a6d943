"""A process that holds a run folder the way ``fit``'s rank 0 does, until it is killed or its stdin closes.

``python -m tests.helpers.run_lock_holder RUN_DIR [STALE_AFTER [GO_FILE]]``: (once GO_FILE exists, so that several
contenders start together) prints ``HELD <the log line>`` once it holds
the folder, or ``BUSY <the message>`` (exit 3) when another job does. The tests start it, then kill it (``kill -9``:
the hold stays behind) or close its stdin (it releases). The owner token comes from the environment, as in ``fit``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dip_lightning.checkpoint.run_lock import RunFolderBusy, RunLock


def main(argv: list[str]) -> int:
    lock = RunLock(argv[0], stale_after=float(argv[1]) if len(argv) > 1 else 600.0)
    while len(argv) > 2 and not Path(argv[2]).exists():
        time.sleep(0.001)
    try:
        line = lock.acquire()
    except RunFolderBusy as busy:
        print(f"BUSY {busy}", flush=True)
        return 3
    print(f"HELD {line}", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
    lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
