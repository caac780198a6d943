"""Every failure the kit understands ends in one ``error:`` line and exit code 2, in every command (LightningCLI's
fit/validate/predict included), never in a traceback; a JSON record never holds NaN (issue 21, finding 6).

The faults are real: truncated and untrusted checkpoint files, files that are no zip, npz files of the wrong kind,
a reference whose mean holds NaN, a read-only run folder (a tmpfs remounted read-only as root, ``chmod``
otherwise) and a full disk (a small tmpfs, root only; skipped with the reason elsewhere). Tests about the message
run the command in this process (``dip_lightning.__main__.main``, stderr captured at the file descriptor, so a
dying thread's report is seen too); those about what a user's shell sees run ``python -m dip_lightning``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.__main__ import main as dip_main
from tests.helpers.commands import run_command
from tests.helpers.mounts import fill, read_only_folder, small_disk
from tests.helpers.tiny import tiny_args

torch.set_num_threads(1)
#: evaluate on CPU with the cheap extractor and no feature cache.
EVAL_FLAGS = ["--extractor", "pixel-projection", "--device", "cpu", "--no_cache", "--batch_size", "16"]


def the_error(err: str) -> str:
    """The one ``error:`` line of a command's stderr, which holds no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _log_to_this_tests_stderr() -> None:
    """Lightning's and torch's loggers got stream handlers on ``sys.stderr`` as it was when they were imported:
    in an earlier test, a capture stream closed since ("--- Logging error ---"). Point those at this test's."""
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # setStream would flush the closed one first


def fails(capfd: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``python -m dip_lightning *argv`` in this process; it must exit 2 with one error line: that line."""
    _log_to_this_tests_stderr()
    capfd.readouterr()
    code = dip_main(list(argv))
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    return the_error(err)


def images(path: Path, count: int, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, arr_0=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    return path


def strict_json(path: Path) -> dict:
    """A JSON file read the way other languages' readers read it: NaN and Infinity are errors."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture()
def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    """A checkpoint cut in half, one holding a pickled object weights-only loading refuses, a text file, and a
    path with no file."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}, "global_step": 2}, whole)
    data = whole.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"opts": argparse.Namespace(lr=1.0)}}, tmp_path / "pickle.ckpt"
    )
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    return {
        "truncated": tmp_path / "truncated.ckpt",
        "untrusted": tmp_path / "pickle.ckpt",
        "not_zip": tmp_path / "text.ckpt",
        "missing": tmp_path / "missing.ckpt",
    }


#: What each bad checkpoint's message says.
CHECKPOINT_PROBLEM = {
    "truncated": "truncated or corrupt",
    "untrusted": "weights_only=True",
    "not_zip": "not a PyTorch checkpoint",
    "missing": "no such checkpoint file",
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_PROBLEM))
@pytest.mark.parametrize("command", ["fit", "validate", "predict"])
def test_lightning_commands_refuse_a_bad_checkpoint_in_one_line(
    command: str,
    damage: str,
    bad_checkpoints: dict[str, Path],
    demo_data: dict,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    ckpt = bad_checkpoints[damage]
    args = tiny_args(tmp_path / "run", demo_data, f"--ckpt_path={ckpt}")
    line = fails(capfd, command, *args)
    assert str(ckpt) in line and CHECKPOINT_PROBLEM[damage] in line, line


@pytest.mark.parametrize("damage", ["truncated", "untrusted", "not_zip", "missing"])
def test_sample_and_evaluate_refuse_a_bad_checkpoint_in_one_line(
    damage: str, bad_checkpoints: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    ckpt = bad_checkpoints[damage]
    line = fails(
        capfd, "sample", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "s.npz"), "--num_samples", "2"
    )
    assert str(ckpt) in line, line
    samples, ref = images(tmp_path / "samples.npz", 8), images(tmp_path / "ref.npz", 8, seed=1)
    line = fails(capfd, "evaluate", str(samples), str(ref), "--ckpt_path", str(ckpt), *EVAL_FLAGS)
    assert str(ckpt) in line, line


@pytest.mark.slow
def test_fit_of_a_missing_and_a_truncated_checkpoint_through_the_real_command(
    bad_checkpoints: dict[str, Path], demo_data: dict, tmp_path: Path
) -> None:
    for damage in ("missing", "truncated"):
        ckpt = bad_checkpoints[damage]
        result = run_command("fit", *tiny_args(tmp_path / "run", demo_data, f"--ckpt_path={ckpt}"))
        assert result.returncode == 2, result.stderr[-3000:]
        line = the_error(result.stderr)
        assert str(ckpt) in line and CHECKPOINT_PROBLEM[damage] in line, line


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_refuses_files_that_are_no_image_npz_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    ref = images(tmp_path / "ref.npz", 8, seed=1)
    text = tmp_path / "text.npz"
    text.write_text("not a zip\n")
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((4, 16, 16, 3), np.float32))
    other_key = tmp_path / "other_key.npz"
    np.savez(other_key, images=np.zeros((4, 16, 16, 3), np.uint8))
    cut = tmp_path / "cut.npz"
    whole = images(tmp_path / "whole.npz", 8).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    cases = {
        text: "not a readable npz",
        floats: "must be a C-order uint8 (N, H, W, 3) array",
        other_key: "no 'arr_0' array",
        cut: "not a readable npz",
    }
    for samples, problem in cases.items():
        line = fails(capfd, "evaluate", str(samples), str(ref), *EVAL_FLAGS)
        assert str(samples) in line and problem in line, line
    line = fails(capfd, "evaluate", str(images(tmp_path / "s.npz", 8)), str(text), *EVAL_FLAGS)
    assert str(text) in line and "not an npz (zip) file" in line, line
    line = fails(capfd, "evaluate", str(tmp_path / "nope.npz"), str(ref), *EVAL_FLAGS)
    assert "nope.npz not found" in line, line


def test_evaluate_with_a_nan_reference_is_an_error_naming_the_file_and_writes_no_json(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Was: exit 0 and ``"fid": NaN`` in the JSON (invalid JSON), ``unavailable`` empty."""
    from dip_lightning.core.metrics.features import PixelProjection

    dims = PixelProjection().num_features
    mu = np.zeros(dims)
    mu[3] = np.nan
    ref = tmp_path / "stats.npz"
    np.savez(
        ref, mu=mu, sigma=np.eye(dims), num_samples=np.int64(100), extractor=np.str_(PixelProjection().name)
    )
    out = tmp_path / "metrics.json"
    samples = images(tmp_path / "samples.npz", 8)
    line = fails(
        capfd, "evaluate", str(samples), str(ref), "--metrics", "fid", "--json", str(out), *EVAL_FLAGS
    )
    assert str(ref) in line and "mu holds NaN" in line and "fid-stats" in line, line
    assert not out.exists()


def test_evaluate_without_images_says_so_and_with_one_image_says_why_each_metric_is_missing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Was: 0 images ended in "samples are 1x1 but the reference images are 16x16"; 1 image left FID, sFID,
    precision and recall null without a word."""
    ref = images(tmp_path / "ref.npz", 8, seed=1)
    empty = tmp_path / "empty.npz"
    np.savez(empty, arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    line = fails(capfd, "evaluate", str(empty), str(ref), "--patch_size", "4", *EVAL_FLAGS)
    assert str(empty) in line and "the sample file holds no images" in line, line

    out = tmp_path / "one.json"
    one = images(tmp_path / "one.npz", 1)
    assert (
        dip_main(["evaluate", str(one), str(ref), "--patch_size", "4", "--json", str(out), *EVAL_FLAGS]) == 0
    )
    printed = capfd.readouterr()
    record = strict_json(out)
    for metric in ("fid", "sfid"):
        assert record[metric] is None and "needs at least 2 samples" in record["unavailable"][metric]
    for metric in ("precision", "recall"):
        assert record[metric] is None and "needs more than 3 samples" in record["unavailable"][metric]
    assert "note: fid: needs at least 2 samples" in printed.err
    assert record["inception_score"] is not None and record["patch_seam"] is not None
    assert set(record["unavailable"]) == {m for m in record["unavailable"] if record[m] is None}


# ------------------------------------------------------------------------------------------------ read-only
def _image_folder(root: Path, classes: int = 2, per_class: int = 20, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # incompressible: fills the disk
            Image.fromarray(noise).save(root / f"c{c}" / f"{i}.png")
    return root


def test_a_read_only_run_folder_is_one_line_in_fit_and_validate(
    demo_data: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Was: 155 lines of two tracebacks (TensorBoard's writer thread and the main thread). fit now meets the
    folder when it takes its hold; validate still meets it in TensorBoard's writer thread, whose traceback the
    command keeps quiet (the main thread reports the same failure)."""
    problem = "read-only file system" if os.geteuid() == 0 else "permission denied"
    with read_only_folder(tmp_path / "ro") as folder:
        run = folder / "run"
        line = fails(capfd, "fit", *tiny_args(run, demo_data))
        assert str(run) in line and problem in line.lower(), line
        line = fails(capfd, "validate", *tiny_args(folder, demo_data, "--trainer.limit_val_batches=1"))
        assert str(folder) in line and problem in line.lower(), line


def test_a_read_only_output_is_one_line_in_prepare_and_evaluate(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    src = _image_folder(tmp_path / "src", per_class=2, size=16)
    samples, ref = images(tmp_path / "samples.npz", 8), images(tmp_path / "ref.npz", 8, seed=1)
    with read_only_folder(tmp_path / "ro") as folder:
        line = fails(capfd, "prepare", "--src", str(src), "--out", str(folder / "shards"), "--quiet")
        assert str(folder / "shards") in line, line
        out = folder / "metrics.json"
        line = fails(capfd, "evaluate", str(samples), str(ref), "--json", str(out), *EVAL_FLAGS)
        assert str(out) in line and ".tmp" not in line, line  # the target, not the temporary file


# ------------------------------------------------------------------------------------------------ disk full
def test_a_full_disk_is_one_line_naming_the_file_in_prepare(tmp_path: Path) -> None:
    """Was: a traceback ending in "ValueError: write to closed file" (tarfile's stream flushing again when
    collected). Through the real command: that message came from garbage collection at exit."""
    src = _image_folder(tmp_path / "src")
    with small_disk(tmp_path / "disk", 256) as disk:
        out = disk / "shards"
        result = run_command(
            "prepare", "--src", str(src), "--out", str(out), "--size", "64", "--shard_size", "8", "--workers", "1",
            "--format", "png", "--png_level", "0", "--quiet",
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-3000:]
        line = the_error(result.stderr)
        assert "no space left on device" in line and str(out / "train-") in line, line
        assert "write to closed file" not in result.stderr
        assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_a_full_disk_is_one_line_naming_the_file_in_evaluate(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    samples, ref = images(tmp_path / "samples.npz", 8), images(tmp_path / "ref.npz", 8, seed=1)
    with small_disk(tmp_path / "disk", 64) as disk:
        fill(disk)
        out = disk / "metrics.json"
        line = fails(capfd, "evaluate", str(samples), str(ref), "--json", str(out), *EVAL_FLAGS)
        assert "no space left on device" in line and str(out) in line, line
        assert not out.exists()


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_checkpoint_in_fit(
    demo_data: dict, tmp_path: Path
) -> None:
    """Was: a traceback ending in ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos``."""
    with small_disk(tmp_path / "disk", 1024) as disk:
        run = disk / "run"
        result = run_command("fit", *tiny_args(run, demo_data, "--checkpoint.every_n_train_steps=1"))
        assert result.returncode == 2, result.stderr[-3000:]
        line = the_error(result.stderr)
        assert "no space left on device" in line and str(run / "checkpoints" / "step00000001.ckpt") in line, (
            line
        )


@pytest.mark.slow
def test_rank_0_alone_meeting_a_full_disk_ends_both_ranks_without_a_traceback(
    demo_data: dict, tmp_path: Path
) -> None:
    """Two ranks from Lightning's own launcher: only rank 0 writes checkpoints, so only it meets the full disk
    while rank 1 waits in the save's barrier. Was: rank 1 died of the lost connection with a gloo traceback (with
    NCCL it would wait for the 30-minute timeout); now rank 0 ends it and reports the one line."""
    with small_disk(tmp_path / "disk", 1024) as disk:
        run = disk / "run"
        args = tiny_args(
            run,
            demo_data,
            "--checkpoint.every_n_train_steps=1",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
        )
        result = run_command("fit", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        line = the_error(result.stderr)
        assert "no space left on device" in line and str(run) in line, line


# ------------------------------------------------------------------------------------------------ pass-through
def test_lightnings_own_exits_and_usage_errors_pass_through_unchanged(
    demo_data: dict, tmp_path: Path
) -> None:
    """``--help`` ends LightningCLI with SystemExit(0), an unknown option argparse's SystemExit(2), a SIGTERM
    mid-training the preemption guard's ``TrainingInterrupted`` (exit 143): run_command changes none of them."""
    from dip_lightning.training.callbacks.preemption import TrainingInterrupted
    from tests.helpers.resume import probe_args, resume_args

    with pytest.raises(SystemExit) as help_exit:
        dip_main(["fit", "--help"])
    assert help_exit.value.code == 0
    with pytest.raises(SystemExit) as usage_exit:
        dip_main(["evaluate", "--no_such_option"])
    assert usage_exit.value.code == 2
    args = resume_args(tmp_path / "run", demo_data, *probe_args(tmp_path / "out", signal_at_step=2), steps=6)
    with pytest.raises(TrainingInterrupted) as stopped:
        dip_main(["fit", *args])
    assert stopped.value.code == 128 + signal.SIGTERM and (tmp_path / "run" / "hpc_ckpt_1.ckpt").is_file()


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--model.net.init_args.patch_size=5", "input_size 32 is not divisible by patch_size 5"),
        ("--model.sampler.init_args.num_steps=0", "num_steps must be >= 1"),
        (
            '--trainer.callbacks=[{"class_path": "dip_lightning.training.callbacks.EMA", '
            '"init_args": {"decays": [0.9, 0.9]}}]',
            "decays must differ",
        ),
    ],
    ids=["patch_size", "num_steps", "ema_decays"],
)
def test_an_impossible_option_is_one_error_line(
    tmp_path: Path, demo_data: dict, capfd: pytest.CaptureFixture[str], option: str, named: str
) -> None:
    """Options the kit cannot run with (ConfigError) end like every other understood failure, before a run folder
    gets anything written."""
    line = fails(capfd, "fit", *tiny_args(tmp_path / "run", demo_data), option)
    assert named in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("command", ["demo", "sample", "sweep"])
def test_a_misspelled_experiment_is_named_by_the_option_the_user_gave(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], command: str
) -> None:
    """``--experiment demoo`` is refused as ``--experiment``, not as the ``--config`` it is passed on with."""
    given = {
        "demo": ["--data_dir", str(tmp_path / "data"), "--run_root", str(tmp_path / "runs")],
        "sample": [
            "--ckpt_path",
            str(tmp_path / "x.ckpt"),
            "--out",
            str(tmp_path / "s.npz"),
            "--num_samples",
            "4",
        ],
        "sweep": ["--ckpt_path", str(tmp_path / "x.ckpt"), "--reference", str(tmp_path / "r.npz")]
        + ["--num_samples", "4", "--out", str(tmp_path / "sweep")],
    }[command]
    threads = torch.get_num_threads()
    line = fails(capfd, command, *given, "--experiment", "demoo")
    assert line.startswith("error: --experiment demoo: no such file, and no shipped recipe named 'demoo'"), (
        line
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "sweep").exists()
    assert torch.get_num_threads() == threads  # refused before demo sets its --threads
