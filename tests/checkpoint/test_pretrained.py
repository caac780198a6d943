"""Writing a pretrained folder: complete files only, nothing already there replaced without ``overwrite``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_pretrained_config,
    read_pretrained_weights,
    write_pretrained,
)

MODEL = {"net": {"class_path": "dip_lightning.core.models.DiP", "init_args": {}}}


def test_written_weights_read_back_bit_for_bit_with_their_dtypes(tmp_path: Path) -> None:
    weights = {
        "a": torch.randn(3, 4, dtype=torch.bfloat16),
        "b": torch.arange(6, dtype=torch.float64).reshape(2, 3).t(),  # not contiguous
        "c": torch.tensor([1, 2], dtype=torch.int64),
    }
    weights["tied"] = weights["a"]  # shared memory: safetensors stores each on its own
    write_pretrained(tmp_path / "f", {"model": MODEL}, weights, "# card\n")
    back = read_pretrained_weights(tmp_path / "f")
    assert back.keys() == weights.keys()
    for key, value in weights.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    config = read_pretrained_config(tmp_path / "f")
    assert config["format"] == "dip-lightning" and config["model"] == MODEL
    assert (tmp_path / "f" / CARD_FILE).read_text() == "# card\n"


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path: Path) -> None:
    folder = write_pretrained(tmp_path / "f", {"model": MODEL}, {"w": torch.zeros(2)}, "first")
    before = {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)}
    with pytest.raises(FileExistsError, match="already holds model.safetensors, README.md, config.json"):
        write_pretrained(folder, {"model": MODEL}, {"w": torch.ones(2)}, "second")
    assert {name: (folder / name).read_bytes() for name in before} == before
    write_pretrained(folder, {"model": MODEL, "note": 1}, {"w": torch.ones(2)}, "second", overwrite=True)
    assert torch.equal(read_pretrained_weights(folder)["w"], torch.ones(2))
    assert json.loads((folder / CONFIG_FILE).read_text())["note"] == 1
