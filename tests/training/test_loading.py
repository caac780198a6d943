"""Loading a trained or converted DiP for sampling: one read of the checkpoint, and errors that name the file,
the problem and the fix instead of torch's tracebacks (``size mismatch ...``, ``PytorchStreamReader failed``).

The commands run as real subprocesses where their exit code and stderr are what is tested.
"""

from __future__ import annotations

import subprocess
import sys
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
    """``--experiment`` builds an 8-class network for a 10-class checkpoint: not torch's ``size mismatch``."""
    out = tmp_path / "samples.npz"
    config = ["--experiment", TINY_CONFIG, str(small_net_config(tmp_path))]
    error = user_error(run_sample("--ckpt_path", str(ten_class_ckpt), *config, "--out", str(out)))
    assert str(ten_class_ckpt) in error
    assert "net.init_args.num_classes: checkpoint 10, this run 8" in error
    assert "net.y_embedder.embedding_table.weight [11, 64] vs [9, 64]" in error
    assert "Drop --experiment" in error and "the experiment it was trained with" in error
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


# ------------------------------------------------------------------------------------------ what a config may import
@pytest.fixture(scope="module")
def zen_ckpt(ten_class_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights-only checkpoint whose stored config names ``this.Zen``: importing ``this`` prints the Zen of Python,
    so the output shows whether anything imported it."""
    checkpoint = torch.load(ten_class_ckpt, weights_only=True, map_location="cpu")
    checkpoint["hyper_parameters"]["net"]["class_path"] = "this.Zen"
    path = tmp_path_factory.mktemp("zen") / "zen.ckpt"
    torch.save(checkpoint, path)
    return path


def test_dotted_option_values_are_checked_and_plain_strings_are_not() -> None:
    from dip_lightning.checkpoint.stored_config import UntrustedConfigError, check_stored_config

    ours = {
        "net": {"class_path": "dip_lightning.core.models.DiP", "init_args": {"depth": 2}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}},
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "sampler": {"class_path": "EulerSampler"},  # a bare name resolves among imported subclasses only
        "paths": ["data/demo/ref_val.npz", "ref_val.npz", "weights.pth"],  # not importable modules
        "sample_dtype": "bfloat16",
    }
    check_stored_config(ours, "x.ckpt")
    for value, where in (
        (
            {"optimizer": "os.system"},
            "hyper_parameters.optimizer",
        ),  # a callable-typed option takes a dotted name
        ({"net": {"init_args": {"head": {"class_path": "numpy.lib.Foo"}}}}, "net.init_args.head.class_path"),
        ({"callbacks": [{"_class_path": "subprocess.Popen"}]}, r"callbacks\[0\]._class_path"),
    ):
        with pytest.raises(UntrustedConfigError, match=where):
            check_stored_config(value, "x.ckpt")
        check_stored_config(value, "x.ckpt", trusted=True)


def test_predict_refuses_a_checkpoint_naming_foreign_code(zen_ckpt: Path, tmp_path: Path) -> None:
    from dip_lightning.checkpoint.stored_config import UntrustedConfigError
    from dip_lightning.training.cli import DiPCLI

    args = ["predict", "--config", TINY_CONFIG, f"--ckpt_path={zen_ckpt}"]
    args += ["--data", "dip_lightning.core.data.LabelSeedDataModule", "--data.num_samples=2"]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    if "this" in sys.modules:
        pytest.skip("`this` was imported by an earlier test of this session: the import could not be seen")
    with pytest.raises(UntrustedConfigError, match="--weights_only=false"):
        DiPCLI(args=args)
    assert "this" not in sys.modules


def test_a_stored_config_naming_foreign_code_is_refused_before_import(
    zen_ckpt: Path, capsys: pytest.CaptureFixture
) -> None:
    from dip_lightning.checkpoint.stored_config import UntrustedConfigError
    from dip_lightning.training.loading import load_module

    assert "this" not in sys.modules
    with pytest.raises(
        UntrustedConfigError, match=r"zen.ckpt: its stored config names 'this.Zen' at hyper_par"
    ):
        load_module(zen_ckpt)
    assert "this" not in sys.modules and "Zen of Python" not in capsys.readouterr().out
    with pytest.raises(Exception, match="this.Zen"):  # trusted: built as asked, which imports `this`
        load_module(zen_ckpt, trust_pickle=True)
    assert "The Zen of Python" in capsys.readouterr().out


@pytest.mark.slow
def test_sample_refuses_a_checkpoint_naming_foreign_code(zen_ckpt: Path, tmp_path: Path) -> None:
    result = run_sample("--ckpt_path", str(zen_ckpt), "--out", str(tmp_path / "samples.npz"))
    error = user_error(result)
    assert "names 'this.Zen' at hyper_parameters.net.class_path" in error and "--trust_pickle" in error
    assert "Zen of Python" not in result.stdout + result.stderr
