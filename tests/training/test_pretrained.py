"""Pretrained folders (config.json + model.safetensors) read back as a module: exactly, without pickle, and with
errors that name the folder, the problem and the fix."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.compatibility import CheckpointMismatchError
from dip_lightning.checkpoint.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PretrainedFolderError,
    read_pretrained_weights,
)
from dip_lightning.checkpoint.stored_config import UntrustedConfigError
from dip_lightning.core.errors import ConfigError
from dip_lightning.training.loading import load_module
from dip_lightning.training.pretrained import load_pretrained
from tests.helpers.pretrained import tiny_model, write_tiny_folder
from tests.helpers.weights import assert_same


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_tiny_folder(tmp_path / "tiny")


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling (torch.load, pickle) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pretrained folder was read with pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_load_pretrained_rebuilds_the_module_with_the_exact_weights_and_no_pickle(
    folder: Path, no_pickle: None
) -> None:
    module = load_pretrained(folder)
    assert_same({f"{k}": v for k, v in module.net.state_dict().items()}, read_pretrained_weights(folder))
    assert module.num_classes == 4 and module.image_shape == (3, 32, 32)
    assert module.sampler.num_steps == 2 and module.loaded_weights == "test weights"
    assert not module.training
    again = load_module(folder)  # what sample uses: the same module
    seeds, labels = torch.arange(3), torch.tensor([0, 1, 3])
    assert torch.equal(module.generate(labels, seeds), again.generate(labels, seeds))


def test_a_folder_without_its_config_or_weights_says_what_is_missing(folder: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(PretrainedFolderError, match=f"no {WEIGHTS_FILE}.*`export` writes them"):
        load_pretrained(folder)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(PretrainedFolderError, match=f"no {CONFIG_FILE}"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no such pretrained folder"):
        load_pretrained(folder / "elsewhere")


def test_a_damaged_weights_or_config_file_is_named(folder: Path) -> None:
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PretrainedFolderError, match=f"{weights} is truncated or corrupt"):
        load_pretrained(folder)
    (folder / CONFIG_FILE).write_text('{"format": "dip-lightning", "model": ')
    with pytest.raises(PretrainedFolderError, match="is not valid JSON"):
        load_pretrained(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"architectures": ["SomethingElse"]}))
    with pytest.raises(PretrainedFolderError, match="is not a dip-lightning config"):
        load_pretrained(folder)


def test_weights_of_another_network_name_the_tensors(folder: Path, tmp_path: Path) -> None:
    """config.json of a wider network than the weights: the shapes, not torch's ``size mismatch``."""
    other = write_tiny_folder(tmp_path / "wide", tiny_model(hidden_size=64))
    (folder / CONFIG_FILE).write_bytes((other / CONFIG_FILE).read_bytes())
    with pytest.raises(
        CheckpointMismatchError,
        match=r"(?s)net\.x_embedder\.proj\.weight \[32, 192\] vs \[64, 192\].*different networks",
    ):
        load_pretrained(folder)


def test_a_class_outside_the_allow_list_is_refused_before_it_is_imported(folder: Path) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model"]["net"]["init_args"]["head"]["class_path"] = "this.Zen"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    sys.modules.pop("this", None)
    with pytest.raises(UntrustedConfigError, match=r"names 'this\.Zen' at model\.net\.init_args\.head"):
        load_pretrained(folder)
    assert "this" not in sys.modules


def test_a_kit_name_that_is_no_class_is_a_clear_error(folder: Path) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model"]["net"]["class_path"] = "dip_lightning.core.models.NoSuchNetwork"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        PretrainedFolderError,
        match="does not build a DiP module .module .dip_lightning.core.models. has no attribute .NoSuchNetwork.",
    ):
        load_pretrained(folder)


def test_load_module_refuses_weight_requests_and_configs_for_a_folder(folder: Path) -> None:
    with pytest.raises(ConfigError, match="holding one set of weights; --weights raw"):
        load_module(folder, weights="raw")
    with pytest.raises(ConfigError, match="drop --experiment"):
        load_module(folder, ["some.yaml"])


def test_fine_tuning_starts_from_a_folder_through_the_released_loader(folder: Path) -> None:
    """``training.released.load_weights_into(module, folder)``: the weights into a freshly built module."""
    from dip_lightning.training.pretrained import build_module
    from dip_lightning.training.released import load_weights_into as load_into
    from tests.helpers.pretrained import TINY_MODEL

    target = build_module(TINY_MODEL)
    assert "pretrained folder, test weights" in load_into(target, folder)
    assert_same(target.net.state_dict(), read_pretrained_weights(folder))


def test_sample_of_a_folder_it_cannot_read_is_one_error_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dip_lightning.commands import run_command

    (folder / WEIGHTS_FILE).unlink()
    out = tmp_path / "s.npz"
    assert run_command(["sample", "--ckpt_path", str(folder), "--out", str(out), "--num_samples", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {folder} is not a complete pretrained folder")
    assert not out.exists()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert run_command(["sample", "--ckpt_path", str(run), "--out", str(out), "--num_samples", "2"]) == 2
    assert f"It looks like a run folder: pass {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
