"""`python -m dip_lightning`: one help that lists every command, one flag style (underscores, the hyphenated
spelling accepted), and every command's own --help working."""

from __future__ import annotations

import pytest

from dip_lightning import commands
from dip_lightning.commands import COMMANDS, CommandParser
from tests.helpers.commands import run_command


def test_top_level_help_lists_every_command() -> None:
    proc = run_command("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS)  # tests/test_layers.py: every command file is in the registry
    assert set(COMMANDS) >= {"fit", "sample", "evaluate", "fid-stats", "convert", "prepare", "demo", "models"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_its_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        commands.run_command([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m dip_lightning" in out and "usage:" in out


def test_unknown_command_lists_the_commands(capsys: pytest.CaptureFixture) -> None:
    assert commands.run_command(["smaple"]) == 2
    out = capsys.readouterr().out
    assert "unknown command 'smaple'" in out and "sample" in out


def test_flags_use_underscores_and_accept_the_hyphenated_spelling(capsys: pytest.CaptureFixture) -> None:
    parser = CommandParser("demo")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--is_score", action="store_true")
    assert parser.parse_args(["--batch-size", "3", "--no-is-score"]).batch_size == 3
    assert parser.parse_args(["--batch_size=4"]).batch_size == 4 and not parser.parse_args([]).is_score
    assert parser.parse_args(["--is-score"]).is_score
    assert "--batch-size" not in parser.format_help()  # the alias is accepted, not advertised
    with pytest.raises(ValueError, match="underscores"):
        parser.add_argument("--image-size")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_is_the_installed_package_version(flag: str, capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    assert commands.run_command([flag]) == 0
    assert capsys.readouterr().out.strip() == f"dip-lightning {version('dip-lightning')}"
