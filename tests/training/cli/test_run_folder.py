"""The run folder through the real CLI: one fit at a time, resume from the newest complete checkpoint, one
``last.ckpt``, a disk that fills up."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.io import CheckpointWriteError
from dip_lightning.checkpoint.run_folder import DAMAGED_FOLDER, RUN_LOCK, SUPERSEDED_FOLDER
from dip_lightning.checkpoint.run_lock import RunFolderBusy
from tests.helpers.resume import probe_args, run_fit, snapshot
from tests.helpers.tiny import subprocess_env, tiny_args


def _args(run: Path, data: dict, *extra: str, steps: int, every: int = 2) -> list[str]:
    return tiny_args(run, data, f"--checkpoint.every_n_train_steps={every}", *extra, steps=steps)


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _lr(path: Path) -> float:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return float(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])


def _resume_line(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("Resume:"))


# ------------------------------------------------------------------------------------------ one fit per folder
def test_fit_on_a_held_folder_is_refused_before_anything_is_written(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    stop, _ = run_fit(_args(run, demo_data, steps=2))
    assert stop is None and not (run / RUN_LOCK).exists()  # released at the end
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.run_lock_holder", str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(threads=1),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("HELD ")
        before = {k: v for k, v in snapshot(run).items() if k != RUN_LOCK}
        with pytest.raises(RunFolderBusy, match=f"run folder {run} is in use: a fit \\(pid {holder.pid} on "):
            run_fit(_args(run, demo_data, "--model.optimizer.init_args.lr=5e-3", steps=4))
        assert {k: v for k, v in snapshot(run).items() if k != RUN_LOCK} == before
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.slow
def test_two_fits_within_seconds_on_one_folder(tmp_path: Path, demo_data: dict) -> None:
    """The issue's case: a second `fit` (another lr) while the first trains. The second is refused with the
    holder named; the folder holds the first run's files only."""
    run, env = tmp_path / "run", subprocess_env(threads=1)
    first_args = _args(
        run, demo_data, *probe_args(tmp_path / "out", progress_every=1, step_sleep=0.5), steps=60
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "dip_lightning", "fit", *first_args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if "PROGRESS global_step=1" in line:
                break
        second_args = _args(run, demo_data, "--model.optimizer.init_args.lr=5e-3", steps=60)
        second = subprocess.run(
            [sys.executable, "-m", "dip_lightning", "fit", *second_args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert first.poll() is None, "the first fit ended before the second was checked"
        first.send_signal(signal.SIGTERM)  # enough: it saves and stops
        rest = first.stdout.read()
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, rest[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode != 0
    assert f"run folder {run} is in use: a fit (pid {first.pid} on " in second.stderr, second.stderr[-3000:]
    assert "last heartbeat" in second.stderr and "Resume:" not in second.stderr + second.stdout
    checkpoints = sorted(run.rglob("*.ckpt"))
    assert checkpoints and all(_lr(p) == 2e-3 for p in checkpoints)  # the first run's lr (the tiny config's)
    assert not any("-v" in p.name for p in checkpoints)
    assert "lr: 0.002" in (run / "tensorboard" / "config.yaml").read_text()
    assert not (run / RUN_LOCK).exists()


# ------------------------------------------------------------------------------------------ newest complete
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_last_is_set_aside_and_fit_continues_from_the_step_file(
    tmp_path: Path, demo_data: dict, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    assert run_fit(_args(run, demo_data, steps=4))[0] is None
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000] if damage == "truncated" else b"")
    with pytest.warns(
        UserWarning, match=f"Damaged checkpoint {last} .* set aside as .*{DAMAGED_FOLDER}/last-"
    ):
        stop, lines = run_fit(_args(run, demo_data, steps=6))
    assert stop is None
    line = _resume_line(lines)
    assert line.startswith(
        f"Resume: from step checkpoint {run / 'checkpoints' / 'step00000004.ckpt'} (step 4)."
    )
    [aside] = (run / "checkpoints" / DAMAGED_FOLDER).iterdir()
    assert aside.stat().st_size == (1000 if damage == "truncated" else 0)
    assert _step(last) == 6


@pytest.mark.slow
def test_ckpt_path_then_resume_keeps_one_last_checkpoint(tmp_path: Path, demo_data: dict) -> None:
    """`fit --ckpt_path <earlier step>` used to leave last.ckpt (step 4) beside last-v1.ckpt (step 6); a change of
    every_n_train_steps leaves no versioned names either."""
    run = tmp_path / "run"
    folder = run / "checkpoints"
    assert run_fit(_args(run, demo_data, steps=4))[0] is None
    with pytest.warns(UserWarning, match="is after --ckpt_path's step 2: moved to"):
        stop, lines = run_fit(_args(run, demo_data, f"--ckpt_path={folder / 'step00000002.ckpt'}", steps=6))
    assert stop is None and _resume_line(lines).startswith("Resume: from --ckpt_path")
    assert sorted(p.name for p in folder.glob("*.ckpt")) == [
        "last.ckpt",
        "step00000002.ckpt",
        "step00000004.ckpt",
        "step00000006.ckpt",
    ]
    assert _step(folder / "last.ckpt") == 6
    assert sorted(p.name.split("-")[0] for p in (folder / SUPERSEDED_FOLDER).iterdir()) == [
        "last",
        "step00000004",
    ]
    stop, lines = run_fit(_args(run, demo_data, steps=9, every=3))
    assert stop is None
    assert _resume_line(lines) == f"Resume: from last checkpoint {folder / 'last.ckpt'} (step 6)."
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert names == ["last.ckpt", *(f"step0000000{s}.ckpt" for s in (2, 4, 6, 9))]
    assert _step(folder / "last.ckpt") == 9


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs to fill (resized by the test with ``mount -o remount``); needs root, skipped (saying why) elsewhere."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mount.stderr.strip() or mount.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_disk_full_during_a_save_then_resume_from_the_newest_complete(
    tmp_path: Path, demo_data: dict, small_disk: Path
) -> None:
    """The issue's case: the disk fills while last.ckpt (step 4) is written; step00000004.ckpt is complete. The
    error names the file and "no space left"; the resume continues from step 4, not last.ckpt's step 2."""
    assert run_fit(_args(tmp_path / "probe", demo_data, steps=2))[0] is None
    size = (tmp_path / "probe" / "checkpoints" / "last.ckpt").stat().st_size
    # Room for step 2, last (2) and step 4, not for the temporary file of last.ckpt at step 4.
    subprocess.run(["mount", "-o", f"remount,size={3 * size + size // 2}", str(small_disk)], check=True)
    run = small_disk / "run"
    with pytest.raises(CheckpointWriteError) as full:
        run_fit(_args(run, demo_data, steps=10))
    last = run / "checkpoints" / "last.ckpt"
    assert str(full.value).startswith(f"cannot write checkpoint {last}: no space left on device")
    assert _step(last) == 2 and _step(run / "checkpoints" / "step00000004.ckpt") == 4
    assert not (run / RUN_LOCK).exists()  # released after the error
    subprocess.run(["mount", "-o", f"remount,size={10 * size}", str(small_disk)], check=True)
    stop, lines = run_fit(_args(run, demo_data, steps=6))
    assert stop is None
    assert _resume_line(lines) == (
        f"Resume: from step checkpoint {run / 'checkpoints' / 'step00000004.ckpt'} (step 4). "
        "Ignored: last.ckpt (stale: step 2 is behind step00000004.ckpt at step 4)."
    )
    assert _step(last) == 6
