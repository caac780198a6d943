"""The kit as a user installs it: the wheel built from this checkout, installed into a fresh virtualenv outside the
checkout, runs its commands from an unrelated folder (console script, ``--version``, shipped recipes).

The new environment reuses this interpreter's installed packages (a ``.pth`` line naming its site-packages) so
that nothing is downloaded; only the kit itself comes from the wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

# What a wheel is built from (what an sdist holds); experiments/ is what dip_lightning/experiments links to.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "dip_lightning", "experiments")


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _build_wheel(root: Path) -> Path:
    """The wheel of a copy of the checkout's sources (the build writes its egg-info beside them, not here)."""
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / name, src / name)
    pip_wheel = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    _run([*pip_wheel, "-w", root / "dist", src], cwd=root)
    (wheel,) = (root / "dist").glob("dip_lightning-*.whl")
    return wheel


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A new virtualenv with the wheel installed and this interpreter's packages reachable; returns its bin/."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # Plain path lines: the .pth files in those folders (an editable install of this checkout) stay unread.
    (Path(purelib.stdout.strip()) / "shared_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh environment's bin/, an empty working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("installed_wheel")
    assert REPO not in root.parents
    bin_dir = _fresh_venv(root, _build_wheel(root))
    work = root / "work"
    work.mkdir()
    return bin_dir, work


def test_the_installed_package_is_the_wheel_with_its_recipes_and_typing_marker(
    installed: tuple[Path, Path],
) -> None:
    bin_dir, work = installed
    probe = (
        # recipe_path("dip_xl16") is what convert reads (released.RELEASED_EXPERIMENT); no torch import here.
        "import dip_lightning, pathlib; from dip_lightning.core.recipes import recipe_names, recipe_path; "
        "root = pathlib.Path(dip_lightning.__file__).parent; "
        "print(root); print((root / 'py.typed').is_file()); print(recipe_path('dip_xl16').is_file()); "
        "print(len(recipe_names()))"
    )
    root, typed, released, count = _run([bin_dir / "python", "-c", probe], cwd=work).stdout.split()
    assert Path(root).parent.parent.parent.parent == bin_dir.parent  # venv/lib/pythonX.Y/site-packages/...
    assert (typed, released) == ("True", "True")
    assert int(count) == len(list(REPO.glob("experiments/**/*.yaml")))


def test_console_script_version_and_help(installed: tuple[Path, Path]) -> None:
    bin_dir, work = installed
    version = re.search(r"^version = \"(.+)\"", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert (
        _run([bin_dir / "dip-lightning", "--version"], cwd=work).stdout.strip() == f"dip-lightning {version}"
    )
    assert "demo-data" in _run([bin_dir / "dip-lightning", "--help"], cwd=work).stdout


def test_demo_data_and_a_shipped_recipe_by_name_from_an_unrelated_folder(
    installed: tuple[Path, Path],
) -> None:
    bin_dir, work = installed
    python = bin_dir / "python"
    small = ["--train_per_class=4", "--val_per_class=2"]
    _run([python, "-m", "dip_lightning", "demo-data", *small], cwd=work)
    assert sorted(p.name for p in (work / "data" / "demo").glob("*-manifest.json")) == [
        "train-manifest.json",
        "val-manifest.json",
    ]
    printed = _run([python, "-m", "dip_lightning", "fit", "--config", "tiny_cpu", "--print_config"], cwd=work)
    assert "default_root_dir: runs/tiny_cpu" in printed.stdout
    assert "dip_lightning.training.callbacks.EMA" in printed.stdout
