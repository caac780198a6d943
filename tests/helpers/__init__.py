"""Code shared by the tests (no tests here): tiny-config arguments, data writers, probes, toy fits, the SLURM
harness."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
