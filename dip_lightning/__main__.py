"""`python -m dip_lightning <command>`.

fit / validate / test / predict go to the LightningCLI (dip_lightning.cli); the other commands are small tools
with their own flags, imported lazily so that `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# command -> "module:function"; each function takes argv (list[str]) and returns an exit code.
TOOLS: dict[str, str] = {
    "sample": "dip_lightning.sample:main",
    "fid": "dip_lightning.fid:main_fid",
    "fid-stats": "dip_lightning.fid:main_fid_stats",
    "convert": "dip_lightning.convert:main",
}


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module_name, func_name = TOOLS[argv[0]].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(argv[1:]) or 0)
    from dip_lightning.cli import cli_main

    # LightningCLI reads sys.argv itself; passing it too would only trigger its "both given" warning.
    cli_main(None if from_sys else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
