"""A process that uses a demo data folder the way a running ``demo`` does, until its stdin closes.

``python -m tests.helpers.demo_data_holder OUT read CROP_LOW CROP_HIGH``: builds (or finds) the demo data with that
crop range, prints ``HELD``, and holds it for reading. ``... OUT rewrite``: holds the folder alone, as a rebuild in
progress does, and prints ``HELD``. ``... OUT build GO_FILE``: once GO_FILE exists (so that several start together),
builds (or finds) the demo data with the default crops, prints ``BUILT``, and exits. Each prints ``BUSY <the message>``
(exit 3) when it cannot have the folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dip_lightning.core.data.demo_dataset import LOCK_NAME, DemoDataInUse, build_demo_dataset, demo_dataset
from dip_lightning.core.folder_lock import FolderLock

# Tiny settings, the tests' own: a build takes about a second.
SETTINGS = {"size": 16, "train_per_class": 2, "val_per_class": 1}


def main(argv: list[str]) -> int:
    out, mode = argv[0], argv[1]
    if mode == "build":
        import numpy  # noqa: F401 - what a build imports, before the start line, so that the builds start together
        import skimage.data  # noqa: F401

        import dip_lightning.core.data.prepare  # noqa: F401

        while not Path(argv[2]).exists():
            time.sleep(0.0005)
        try:
            build_demo_dataset(out, **SETTINGS)
        except DemoDataInUse as busy:
            print(f"BUSY {busy}", flush=True)
            return 3
        print("BUILT", flush=True)
        return 0
    if mode == "rewrite":
        Path(out).mkdir(parents=True, exist_ok=True)
        with FolderLock(out, LOCK_NAME) as lock:
            if not lock.take_alone():
                print("BUSY the folder is held", flush=True)
                return 3
            print("HELD", flush=True)
            sys.stdin.read()
        return 0
    try:
        with demo_dataset(out, **SETTINGS, crop_scale=(float(argv[2]), float(argv[3]))):
            print("HELD", flush=True)
            sys.stdin.read()  # until the test closes stdin (or kills this process)
    except DemoDataInUse as busy:
        print(f"BUSY {busy}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
