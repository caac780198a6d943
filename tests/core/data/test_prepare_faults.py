"""``prepare`` and the shard reader on real faults: unreadable folders and files, a non-UTF-8 name, a FIFO and other
non-regular files, a folder where a shard belongs, a shard cut in half, and kill -9 of a run with worker processes.
Each is skipped and listed (or reported by name and count), never a hang nor an abort of the whole run."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dip_lightning.core.data.prepare import ShardPathTaken, prepare_split
from dip_lightning.core.data.shards import (
    DamagedShardWarning,
    ShardIsAFolder,
    expand_shards,
    shard_sample_counts,
)
from dip_lightning.core.data.streams import TooMuchBadData, TrainShardStream
from tests.helpers import REPO
from tests.helpers.tiny import subprocess_env

torch.set_num_threads(1)
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def _images(folder: Path, n: int, size: int = 12, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((size, size + 2, 3), (7 * i) % 256, np.uint8)).save(
            folder / f"img{i:04d}.png"
        )


def _bad(manifest: dict) -> dict[str, str]:
    return {b["path"]: b["error"] for b in manifest["bad_files"]}


# ------------------------------------------------------------------------------------------ unreadable inputs
def _without_dac_override() -> None:
    """preexec_fn: as root, give up the capabilities that let root read any file, so that chmod 000 holds."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(97)  # the test skips: this process may not drop capabilities


def test_unreadable_class_folder_and_file_are_listed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _images(src / "a", 3)
    _images(src / "b", 2)
    _images(src / "c", 2)
    (src / "b" / "img0000.png").chmod(0)
    (src / "c").chmod(0)
    try:
        args = ["--src", str(src), "--out", str(tmp_path / "out"), "--size", "8", "--workers", "1", "--quiet"]
        result = subprocess.run(
            [sys.executable, "-m", "dip_lightning", "prepare", *args],
            cwd=REPO,
            env=subprocess_env(1),
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_without_dac_override,
        )
    finally:
        (src / "c").chmod(0o755)
    if result.returncode == 97:
        pytest.skip(
            "running as root without CAP_SETPCAP: cannot drop CAP_DAC_OVERRIDE, so chmod 000 reads anyway"
        )
    assert result.returncode == 0, result.stderr
    assert "4 samples in 1 shards, 3 classes, 2 skipped" in result.stdout
    assert "skipped c/: unreadable folder: PermissionError" in result.stdout
    assert "skipped b/img0000.png: PermissionError" in result.stdout
    manifest = json.loads((tmp_path / "out" / "train-manifest.json").read_text())
    assert manifest["class_counts"] == {"a": 3, "b": 1, "c": 0}  # c stays a class: later indices do not shift
    assert set(_bad(manifest)) == {"c/", "b/img0000.png"}


@pytest.mark.timeout(60)  # a FIFO opened for reading blocks until a writer appears: before the fix, forever
def test_non_utf8_names_and_special_files_are_listed_not_fatal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _images(src / "a", 3)
    _images(src / "b", 2)
    odd = os.fsencode(src / "a") + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as f:
        f.write((src / "a" / "img0000.png").read_bytes())
    os.mkfifo(src / "a" / "pipe.png")
    os.symlink(src / "missing.png", src / "b" / "dangling.png")
    os.symlink(src / "a", src / "b" / "linked_folder")
    os.mkdir(os.fsencode(src / "b") + b"/dir\xff")
    manifest = prepare_split(src, tmp_path / "out", image_size=8, workers=1, progress=False)
    assert manifest["num_samples"] == 5 and manifest["class_counts"] == {"a": 3, "b": 2}
    bad = _bad(manifest)
    assert bad == {
        "a/caf\\xe9.png": "the name is not valid UTF-8: rename it",
        "a/pipe.png": "a FIFO, not a regular file",
        "b/dangling.png": "a broken symbolic link, not a regular file",
        "b/dir\\xff": "the name is not valid UTF-8: rename it",
        "b/linked_folder": "a symbolic link to a folder (not followed)",
    }
    assert json.loads((tmp_path / "out" / "train-manifest.json").read_text())["num_bad"] == 5
    assert manifest["source"]["num_files"] == 10


@pytest.mark.timeout(60)
def test_flat_folder_lists_its_special_files(tmp_path: Path) -> None:
    src = tmp_path / "val"
    _images(src, 2)
    os.mkfifo(src / "img9999.png")
    (tmp_path / "labels.txt").write_text("img0000 x\nimg0001 y\nimg9999 x\n")
    manifest = prepare_split(
        src,
        tmp_path / "out",
        split="val",
        image_size=8,
        labels=tmp_path / "labels.txt",
        workers=1,
        progress=False,
    )
    assert manifest["num_samples"] == 2 and _bad(manifest) == {"img9999.png": "a FIFO, not a regular file"}


def test_a_fifo_slipped_in_after_listing_is_not_waited_for(tmp_path: Path) -> None:
    """The worker opens inputs non-blocking and checks that they are regular files (the listing may be old)."""
    from dip_lightning.core.data.prepare import NotARegularFile, read_input
    from dip_lightning.core.data.preprocess import ImageLimits

    os.mkfifo(tmp_path / "late.png")
    with pytest.raises(NotARegularFile, match="not a regular file"):
        read_input(str(tmp_path / "late.png"), ImageLimits())


# ------------------------------------------------------------------------------------------ a folder in the way
def test_a_folder_named_like_a_shard_is_called_a_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _images(src / "a", 2)
    out = tmp_path / "out"
    (out / "train-000000.tar").mkdir(parents=True)
    with pytest.raises(
        ShardPathTaken, match=r"train-000000.tar is a folder .* where prepare writes a shard file"
    ):
        prepare_split(src, out, image_size=8, workers=1, progress=False)
    for pattern in ("train-000000.tar", "train-*.tar", "train-{000000..000000}.tar"):
        with pytest.raises(
            ShardIsAFolder, match=r"train-000000.tar' \(pattern .*\) is a folder, not a shard file"
        ):
            expand_shards(str(out / pattern))


# ------------------------------------------------------------------------------------------ truncated shard
def test_a_shard_cut_in_half_is_reported_and_its_missing_samples_count_as_bad(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _images(src / "a", 150)
    _images(src / "b", 150, start=150)
    out = tmp_path / "out"
    prepare_split(src, out, image_size=8, shard_size=256, workers=1, progress=False)
    urls = expand_shards(str(out / "train-*.tar"))
    assert shard_sample_counts(urls) == [256, 44]
    os.truncate(urls[0], os.path.getsize(urls[0]) // 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sizes = shard_sample_counts(urls)
    (message,) = [str(w.message) for w in caught if w.category is DamagedShardWarning]
    found = int(message.split(" holds ")[1].split()[0])
    assert message.startswith(f"shard {urls[0]} holds {found} of the 256 samples its manifest names")
    assert 100 < found < 140 and f"the {256 - found} missing samples count as bad samples" in message
    assert sizes == [256, 44]  # the manifest's count: the missing ones are read as bad samples
    stream = TrainShardStream(
        urls, sizes, image_size=8, batch_size=32, batches_per_epoch=20, num_classes=2, max_bad_fraction=0.05
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooMuchBadData, match=r"unreadable or missing .* max_bad_fraction=0.05"):
            list(stream)
    read, bad = (int(v) for v in stream.counters.sum(0))
    assert read >= 256 and bad > 0.05 * read


# ------------------------------------------------------------------------------------------ kill -9
def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker processes")
def test_kill_9_of_prepare_takes_its_workers_with_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(48):
        folder = tmp_path / "src" / f"k{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (500, 500, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg", quality=90
        )
    out = tmp_path / "out"
    args = ["--src", str(tmp_path / "src"), "--out", str(out), "--size", "256", "--png_level", "9"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dip_lightning",
            "prepare",
            *args,
            "--shard_size",
            "1",
            "--workers",
            "2",
            "--quiet",
        ],
        cwd=REPO,
        env=subprocess_env(1),
    )
    children: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("train-*.tar")) and proc.poll() is None:
            time.sleep(0.05)
        children = _children(proc.pid)
        assert proc.poll() is None and len(children) >= 2, "prepare should be running with its workers"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(c) for c in children):
            time.sleep(0.1)
        survivors = [c for c in children if _alive(c)]
    finally:
        for pid in [proc.pid, *children]:  # only this test's own processes, whatever happened
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not survivors, f"worker processes {survivors} outlived the killed prepare"
    assert len(list(out.glob("train-*.tar"))) < 48
