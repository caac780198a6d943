"""Loading a trained or converted DiP for sampling: one read of the checkpoint, and errors that name the file,
the problem and the fix instead of torch's tracebacks (``size mismatch ...``, ``PytorchStreamReader failed``).

The commands run as real subprocesses where their exit code and stderr are what is tested.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.commands import run_command, user_error
from tests.helpers.tiny import TINY_CONFIG, fit_tiny, small_net_config


@pytest.fixture(scope="module")
def ten_class_ckpt(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> Path:
    """last.ckpt of a 1-step tiny run whose network has 10 classes (the demo data has 8, labels 0-7)."""
    folder = tmp_path_factory.mktemp("ten_classes")
    fit_tiny(
        folder, demo_data, "--model.net.init_args.num_classes=10", "--data.init_args.num_classes=10", steps=1
    )
    return folder / "run" / "checkpoints" / "last.ckpt"


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return run_command("sample", "--num_samples", "2", "--batch_size", "2", *args)


@pytest.mark.slow
def test_sample_with_a_config_of_another_network_says_what_differs_and_how_to_fix(
    ten_class_ckpt: Path, tmp_path: Path
) -> None:
    """``--config`` builds an 8-class network for a 10-class checkpoint: not torch's ``size mismatch``."""
    out = tmp_path / "samples.npz"
    config = ["--config", TINY_CONFIG, "--config", str(small_net_config(tmp_path))]
    error = user_error(run_sample("--ckpt_path", str(ten_class_ckpt), *config, "--out", str(out)))
    assert str(ten_class_ckpt) in error
    assert "net.init_args.num_classes: checkpoint 10, this run 8" in error
    assert "net.y_embedder.embedding_table.weight [11, 64] vs [9, 64]" in error
    assert "Drop --config" in error and "the config it was trained with" in error
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


@pytest.mark.slow
def test_sample_on_a_truncated_checkpoint_names_the_file(ten_class_ckpt: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ten_class_ckpt.read_bytes()[:5000])
    out = tmp_path / "samples.npz"
    error = user_error(run_sample("--ckpt_path", str(truncated), "--out", str(out)))
    assert len(error.splitlines()) == 1
    assert f"{truncated}: the file is truncated or corrupt" in error
    assert not out.exists()


def test_load_module_reads_the_checkpoint_once(ten_class_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dip_lightning.training.loading import load_module

    reads = []
    real_load = torch.load

    def counting_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        reads.append(args[0] if args else kwargs.get("f"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    module = load_module(ten_class_ckpt)
    assert module.num_classes == 10
    assert len(reads) == 1, reads
