"""`python -m dip_lightning <command>`: see :mod:`dip_lightning.commands` for the commands and their help."""

from __future__ import annotations

import sys

from dip_lightning.commands import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
