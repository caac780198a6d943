"""Every YAML in experiments/ parses and instantiates (with tiny overrides), so none can rot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dip_lightning.commands import run_command
from dip_lightning.training.cli import DiPCLI
from tests.helpers import REPO

EXPERIMENTS = REPO / "experiments"
RECIPES = sorted(p for p in EXPERIMENTS.glob("*.yaml"))
ABLATIONS = sorted(EXPERIMENTS.glob("ablations/*.yaml"))
BASE = EXPERIMENTS / "dip_xl16.yaml"

# Shrink the network, keep everything else (head class, placement, options) as the YAML says.
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--model.compile=false",
    "--model.net.init_args.input_size=32",
    "--model.net.init_args.hidden_size=64",
    "--model.net.init_args.depth=2",
    "--model.net.init_args.num_heads=2",
    "--data.init_args.image_size=32",
]
TINY_REPA = (
    '--model.repa.encoder={"class_path": "tests.helpers.tiny_encoder.TinyViTEncoder", '
    '"init_args": {"grid_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 2}}'
)


def merged_yaml(*paths: Path) -> dict:
    """Shallow view of what the configs set (enough to know whether REPA is on)."""
    merged: dict = {}
    for path in paths:
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def instantiate(tmp_path: Path, *configs: Path) -> DiPCLI:
    args = [arg for cfg in configs for arg in ("--config", str(cfg))]
    args += TINY + [f"--trainer.default_root_dir={tmp_path}"]
    if merged_yaml(*configs).get("model", {}).get("repa") is not None:
        args.append(TINY_REPA)
    return DiPCLI(args=args, run=False)


def first_comment(path: Path) -> str:
    return path.read_text().splitlines()[0]


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_recipe_instantiates(tmp_path: Path, config: Path) -> None:
    cli = instantiate(tmp_path, config)
    assert cli.model.net.input_size == 32
    assert cli.datamodule.image_size == 32
    assert first_comment(config).startswith("#"), "each YAML says which paper setting it reproduces"
    assert "Reproduces" in config.read_text()
    if cli.model.repa is not None:  # linked to the network's patch size, set nowhere else
        assert cli.model.repa.encoder.dit_patch_size == cli.model.net.patch_size
    assert "dit_patch_size:" not in [line.strip().split(" ")[0] for line in config.read_text().splitlines()]


def assert_head_as_configured(head: Any, config: dict) -> None:
    if "class_path" in config:
        assert type(head).__name__ == config["class_path"].rsplit(".", 1)[1]
    init_args = config.get("init_args", {})
    if "depth" in init_args:
        assert len(head.widths) == init_args["depth"]
    if "base_channels" in init_args:
        assert head.widths[0] == init_args["base_channels"]


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda p: p.name)
def test_ablation_overlay_instantiates(tmp_path: Path, overlay: Path) -> None:
    cli = instantiate(tmp_path, BASE, overlay)
    text = overlay.read_text()
    assert "Paper" in text or "paper" in text or "release" in text
    net = cli.model.net
    wanted = merged_yaml(overlay).get("model", {}).get("net", {}).get("init_args", {})
    assert_head_as_configured(net.head, wanted.get("head", {}))
    if "placement" in wanted:
        assert net.placement == wanted["placement"]
    if "repa" in merged_yaml(overlay).get("model", {}):
        assert cli.model.repa is None
    # Objective and sampler overlays set what they say (model.flow fields, the sampler class and fields).
    for key, value in merged_yaml(overlay).get("model", {}).get("flow", {}).items():
        assert getattr(cli.model.flow, key) == value, key
    sampler = merged_yaml(overlay).get("model", {}).get("sampler", {})
    if "class_path" in sampler:
        assert type(cli.model.sampler).__name__ == sampler["class_path"].rsplit(".", 1)[1]
    for key, value in sampler.get("init_args", {}).items():
        got = getattr(cli.model.sampler, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    # Every overlay writes to its own run folder (the test overrides it, so read the YAML).
    assert (
        merged_yaml(overlay)["trainer"]["default_root_dir"]
        != merged_yaml(BASE)["trainer"]["default_root_dir"]
    )


def test_run_folders_are_unique() -> None:
    folders = [merged_yaml(p).get("trainer", {}).get("default_root_dir") for p in RECIPES + ABLATIONS]
    folders = [f for f in folders if f]
    assert len(folders) == len(set(folders))


def test_fit_takes_a_shipped_recipe_by_name_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_command(["fit", "--config", "tiny_cpu", "--trainer.max_steps=7", "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7
    assert printed["trainer"]["default_root_dir"] == "runs/tiny_cpu"  # the tiny recipe's own values
    assert printed["model"]["net"]["init_args"]["hidden_size"] == 192


def test_fit_with_an_unknown_recipe_lists_the_shipped_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_command(["fit", "--config", "tiny_cpy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config tiny_cpy: no such file") and "tiny_cpu" in err


def test_a_command_that_builds_its_own_arguments_is_not_warned_about_sys_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    # `python -m dip_lightning demo` (or sample, evaluate ...) hands DiPCLI the arguments it built, while
    # sys.argv holds the user's command line: LightningCLI's "not recommended" warning would only alarm.
    monkeypatch.setattr("sys.argv", ["python -m dip_lightning", "demo", "--threads", "1"])
    cli = instantiate(tmp_path, REPO / "experiments" / "tiny_cpu.yaml")
    assert cli.config.trainer.default_root_dir == str(tmp_path)
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]
