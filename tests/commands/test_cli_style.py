"""One command-line style: every kit command is a jsonargparse parser as fit is, so ``--print_config`` writes its
options as YAML that ``--config`` reads back (a sweep grid in a file), a boolean option behaves one way in every
command and in LightningCLI, and ``--config`` holds nothing but the command's own options."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import ActionYesNo

from dip_lightning import commands
from dip_lightning.commands import COMMANDS, CommandParser
from dip_lightning.evaluation.sweep import grid_cells
from tests.helpers import REPO

KIT_COMMANDS = sorted(name for name, command in COMMANDS.items() if command.module is not None)
TINY_CONFIG = str(REPO / "experiments" / "tiny_cpu.yaml")
OWN = {"help", "config", "print_config"}  # what every parser has besides the command's options


def parser_of(name: str) -> CommandParser:
    return importlib.import_module(f"dip_lightning.commands.{COMMANDS[name].module}").build_parser()


def printed_config(capsys: pytest.CaptureFixture, *argv: str) -> dict[str, Any]:
    """What ``python -m dip_lightning <argv> --print_config`` prints, as a dict."""
    with pytest.raises(SystemExit) as exit_info:
        commands.run_command([*argv, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return yaml.safe_load(captured.out)


def usage_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        commands.run_command(list(argv))
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("name", KIT_COMMANDS)
def test_every_command_prints_every_option_as_yaml(name: str, capsys: pytest.CaptureFixture) -> None:
    parser = parser_of(name)
    options = {action.dest for action in parser._actions} - OWN
    assert set(printed_config(capsys, name)) == options


@pytest.mark.parametrize("name", KIT_COMMANDS)
def test_every_boolean_option_is_one_style(name: str, capsys: pytest.CaptureFixture) -> None:
    """``--x``, ``--x true|false``, ``--x=false``, ``--no_x`` and the hyphenated spelling, in every command."""
    flags = [a for a in parser_of(name)._actions if a.nargs == 0 or isinstance(a, ActionYesNo)]
    assert all(isinstance(a, ActionYesNo) for a in flags if a.dest not in OWN)  # no argparse store_true left
    for action in (a for a in flags if isinstance(a, ActionYesNo)):
        yes, no = action.option_strings[0], action.option_strings[-1]
        assert no == "--no_" + yes[2:]
        for argv, value in (
            ([yes], True),
            ([yes, "false"], False),
            ([yes, "true"], True),
            ([f"{yes}=false"], False),
            ([no], False),
            ([yes.replace("_", "-")], True),
            ([no.replace("_", "-")], False),
        ):
            assert printed_config(capsys, name, *argv)[action.dest] is value, (name, argv)


def test_a_bare_boolean_before_a_positional_argument_leaves_it_alone(capsys: pytest.CaptureFixture) -> None:
    printed = printed_config(capsys, "evaluate", "--no_cache", "samples.npz", "--limit", "3", "ref.npz")
    assert printed["cache"] is False and (printed["samples"], printed["reference"]) == (
        "samples.npz",
        "ref.npz",
    )
    printed = printed_config(capsys, "report", "--no_plots", "run_a", "run_b")
    assert printed["plots"] is False and printed["run_dirs"] == ["run_a", "run_b"]


def test_lightning_cli_booleans_take_the_same_forms(capsys: pytest.CaptureFixture) -> None:
    base = ["fit", "--config", TINY_CONFIG]
    assert printed_config(capsys, *base, "--init_from_strict", "false")["init_from_strict"] is False
    assert printed_config(capsys, *base, "--no_init_from_strict")["init_from_strict"] is False
    assert printed_config(capsys, *base, "--init_from_strict")["init_from_strict"] is True


def test_weights_are_one_syntax_in_sample_sweep_and_validate(capsys: pytest.CaptureFixture) -> None:
    assert printed_config(capsys, "sample", "--weights", "raw")["weights"] == "raw"
    assert printed_config(capsys, "sweep", "--weights", "raw", "ema:0.9")["weights"] == ["raw", "ema:0.9"]
    validate = printed_config(capsys, "validate", "--config", TINY_CONFIG, "--weights", "raw")
    assert validate["weights"] == "raw"


def test_a_sweep_grid_in_yaml_is_the_grid_of_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flags = [
        "--ckpt_path", "run/last.ckpt", "--reference", "ref.npz", "--num_samples", "8", "--out", "sweep",
        "--weights", "ema:0.9", "raw", "--cfg_scale", "1.0", "2.9", "--cfg_interval", "[0.11,0.97]", "[0,1]",
        "--num_steps", "50", "--no_plots",
    ]  # fmt: skip
    written = printed_config(capsys, "sweep", *flags)
    assert written["cfg_interval"] == [[0.11, 0.97], [0.0, 1.0]] and written["plots"] is False
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(written))
    parser = parser_of("sweep")
    from_flags, from_yaml = parser.parse_args(flags), parser.parse_args(["--config", str(grid)])
    axes = ("weights", "cfg_scale", "cfg_interval", "num_steps")
    cells = grid_cells(*(from_yaml[a] for a in axes))
    assert len(cells) == 2 * 2 * 2 and cells == grid_cells(*(from_flags[a] for a in axes))
    assert {k: v for k, v in vars(from_yaml).items() if k != "config"} == {
        k: v for k, v in vars(from_flags).items() if k != "config"
    }
    # A flag after --config overrides the file's value.
    assert parser.parse_args(["--config", str(grid), "--cfg_scale", "4.0"]).cfg_scale == [4.0]


def test_an_experiment_yaml_given_to_config_names_the_option_it_belongs_to(
    capsys: pytest.CaptureFixture,
) -> None:
    error = usage_error(capsys, "sample", "--config", TINY_CONFIG, "--ckpt_path", "x.ckpt", "--out", "x.npz")
    assert f"--config {TINY_CONFIG} is an experiment YAML" in error
    assert f"pass it as --experiment {TINY_CONFIG}" in error
    error = usage_error(capsys, "sweep", "--config", "tiny_cpu")  # a shipped recipe's name
    assert "--config tiny_cpu is an experiment YAML" in error and "pass it as --experiment tiny_cpu" in error
    error = usage_error(capsys, "evaluate", "--config", TINY_CONFIG)
    assert "is an experiment YAML" in error and "builds no model from an experiment YAML" in error


def test_a_list_option_given_twice_is_an_error_not_the_last_values(capsys: pytest.CaptureFixture) -> None:
    error = usage_error(capsys, "sweep", "--cfg_scale", "1.0", "--cfg_scale", "2.0", "--print_config")
    assert "--cfg_scale is given 2 times: list its values once" in error


def test_a_bad_value_in_a_config_file_is_a_usage_error_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_samples: many\n")
    assert 'Parser key "num_samples"' in usage_error(capsys, "sweep", "--config", str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("num_sample: 8\n")
    assert "num_sample" in usage_error(capsys, "sweep", "--config", str(typo))


def test_demo_hands_the_dotted_options_to_the_training_cli() -> None:
    from dip_lightning.commands.demo import split_overrides

    argv = [
        "--threads",
        "1",
        "--trainer.max_steps",
        "5",
        "--data.init_args.batch_size=8",
        "--experiment",
        "x.yaml",
    ]
    own, overrides = split_overrides(argv)
    assert own == ["--threads", "1", "--experiment", "x.yaml"]
    assert overrides == ["--trainer.max_steps", "5", "--data.init_args.batch_size=8"]


def test_demo_hands_the_seed_to_the_training_cli() -> None:
    # The training's seed is a top-level LightningCLI key without a dot; the demo refused it as unknown.
    from dip_lightning.commands.demo import split_overrides

    own, overrides = split_overrides(["--seed_everything=1", "--threads", "1", "--seed_everything", "2"])
    assert own == ["--threads", "1"]
    assert overrides == ["--seed_everything=1", "--seed_everything", "2"]


@pytest.mark.parametrize("name", KIT_COMMANDS)
def test_no_command_takes_an_abbreviated_option_for_a_longer_one(
    name: str, capsys: pytest.CaptureFixture
) -> None:
    # argparse's allow_abbrev took a typo (demo --thread 1) for an option it prefixes (--threads).
    parser = parser_of(name)
    longest = max((o for a in parser._actions for o in a.option_strings if o.startswith("--")), key=len)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([f"{longest[:-1]}=1"])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {longest[:-1]}=1" in capsys.readouterr().err.lower()
