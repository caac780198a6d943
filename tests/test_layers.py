"""The package's shape holds in ``make test`` as well as in ``make lint``: the import-linter contracts of
pyproject.toml (layers, no cycles between siblings) are kept, and command-line code lives in dip_lightning/commands
only, every command file in the registry.

import-linter runs as a real subprocess on the checkout under test (``PYTHONPATH`` first), as ``make lint`` runs it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dip_lightning.commands import COMMANDS
from tests.helpers import REPO
from tests.helpers.tiny import subprocess_env

PACKAGE = REPO / "dip_lightning"
COMMAND_DIR = PACKAGE / "commands"
LAYERS_CONTRACT = "layers: commands > evaluation > training > checkpoint > core"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` in ``root`` (its pyproject.toml, its dip_lightning), without writing a cache there."""
    script = Path(sys.executable).with_name("lint-imports")
    if not script.is_file():
        script = Path(shutil.which("lint-imports") or "lint-imports")
    env = subprocess_env(threads=1)
    env["PYTHONPATH"] = str(root)  # the package in `root`, not an installed copy
    return subprocess.run(
        [str(script), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_are_kept() -> None:
    result = lint_imports(REPO)
    report = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"lint-imports: a contract of pyproject.toml is broken\n{report}", pytrace=False)
    assert LAYERS_CONTRACT in report and "0 broken" in report, report


def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    """Not vacuous: a core module that imports a command fails the check, naming the contract and the import."""
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(PACKAGE, tmp_path / "dip_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    images = tmp_path / "dip_lightning" / "core" / "images.py"
    images.write_text(
        images.read_text() + "\n\ndef _upward() -> None:\n    import dip_lightning.commands.sample\n"
    )
    result = lint_imports(tmp_path)
    report = result.stdout + result.stderr
    assert result.returncode != 0, report
    assert "BROKEN" in report.upper() and LAYERS_CONTRACT in report, report
    assert "dip_lightning.core.images -> dip_lightning.commands.sample" in report, report


def test_every_command_file_is_in_the_registry_and_runs_a_main() -> None:
    files = {p.stem for p in COMMAND_DIR.glob("*.py") if p.name != "__init__.py"}
    registered = {c.module for c in COMMANDS.values() if c.module is not None}
    assert files - registered == set(), "command files missing from dip_lightning.commands.COMMANDS"
    assert registered - files == set(), "registry entries without a file in dip_lightning/commands"
    for module in sorted(files):
        tree = ast.parse((COMMAND_DIR / f"{module}.py").read_text())
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert "main" in functions, f"dip_lightning/commands/{module}.py has no main(argv)"


def _command_line_code(path: Path) -> list[str]:
    """What makes a module a command: a top-level ``main``/``build_parser``, an ``argparse`` import, or an
    ``if __name__ == "__main__":`` block."""
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in (
            "main",
            "build_parser",
        ):
            found.append(f"def {node.name}")
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            found.append('if __name__ == "__main__"')
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if "argparse" in names:
            found.append(f"argparse import (line {node.lineno})")
    return found


def test_no_command_line_code_outside_the_commands() -> None:
    library = [
        p for p in PACKAGE.rglob("*.py") if COMMAND_DIR not in p.parents and p != PACKAGE / "__main__.py"
    ]
    assert len(library) > 20  # the walk found the library
    offenders = {str(p.relative_to(REPO)): found for p in library if (found := _command_line_code(p))}
    assert offenders == {}, "command-line code belongs in dip_lightning/commands/"
