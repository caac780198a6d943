"""The embedded demo dataset: its identity (the settings it was built with), what a rebuild replaces, and one data
folder used by several processes (real ones): read together, rebuilt only when nobody reads it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dip_lightning.core.data.demo_dataset import DemoDataInUse, build_demo_dataset
from tests.helpers import REPO
from tests.helpers.commands import run_command, user_error
from tests.helpers.demo_data_holder import SETTINGS
from tests.helpers.mounts import read_only_folder
from tests.helpers.tiny import subprocess_env


@contextlib.contextmanager
def held(out: Path, *mode: str) -> Iterator[None]:
    """Another process holding ``out`` (tests/helpers/demo_data_holder.py) until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.demo_data_holder", str(out), *mode],
        cwd=REPO,
        env=subprocess_env(threads=1),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("HELD"), line + proc.stderr.read()
        yield
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_a_rebuild_is_refused_while_another_process_reads_the_folder(tmp_path):
    out = tmp_path / "demo"
    with held(out, "read", "0.5", "1.0"):
        before = _shards(out)
        with pytest.raises(DemoDataInUse) as busy:
            build_demo_dataset(out, **SETTINGS, crop_scale=(0.9, 1.0))
        message = str(busy.value)
        assert "crop_scale [0.5, 1.0] -> [0.9, 1.0]" in message, message
        assert "another process is reading it" in message and "--data_dir" in message, message
        assert _shards(out) == before  # the reader's shards are untouched
        same = build_demo_dataset(out, **SETTINGS, crop_scale=(0.5, 1.0))  # the same data is read together
        assert same["replaced"] == {} and _shards(out) == before
    rebuilt = build_demo_dataset(out, **SETTINGS, crop_scale=(0.9, 1.0))  # nobody reads it any more
    assert rebuilt["replaced"] == {"crop_scale": ([0.5, 1.0], [0.9, 1.0])}
    assert _shards(out) != before


def test_a_rebuild_in_progress_is_waited_for_and_announced(tmp_path):
    out = tmp_path / "demo"
    told: list[str] = []
    built: list[dict] = []
    with held(out, "rewrite"):
        reader = threading.Thread(
            target=lambda: built.append(build_demo_dataset(out, **SETTINGS, on_wait=told.append))
        )
        reader.start()
        deadline = time.monotonic() + 30
        while not told and time.monotonic() < deadline:
            time.sleep(0.05)
        assert told == [f"{out} is being rewritten by another process; waiting for it to finish"]
        assert reader.is_alive() and not built
    reader.join(timeout=60)
    assert built and built[0]["num_train"] == 8 * SETTINGS["train_per_class"]


def test_a_complete_folder_on_a_read_only_filesystem_is_used_without_a_lock(tmp_path):
    source = tmp_path / "source"
    first = build_demo_dataset(source, **SETTINGS)
    with read_only_folder(tmp_path / "ro", populate=source) as ro:
        again = build_demo_dataset(ro, **SETTINGS)
    assert again["num_train"] == first["num_train"]


def test_the_demo_command_refuses_to_rebuild_data_another_demo_reads(tmp_path):
    out = tmp_path / "data"
    with held(out, "read", "0.5", "1.0"):
        before = _shards(out)
        result = run_command(
            "demo", "--data_dir", str(out), "--run_root", str(tmp_path / "runs"), cwd=tmp_path
        )
        assert _shards(out) == before
    message = user_error(result)
    assert "another process is reading it" in message and "demo --data_dir" in message, message
    assert not (tmp_path / "runs").exists()


def test_demo_rebuild_with_other_crops_removes_the_old_metrics_references(tmp_path):
    # The demo writes ref_val*.npz beside the shards and reuses it while it exists: kept across a rebuild with other
    # crops, it would score every later run against the statistics of crops that are gone.
    out = tmp_path / "demo"
    build_demo_dataset(out, size=16, train_per_class=4, val_per_class=2, crop_scale=(0.7, 1.0))
    stale = [out / "ref_val.npz", out / "ref_val-pixel-projection-64x8-seed0.npz"]
    for path in stale:
        path.write_bytes(b"statistics of the old crops")
    (out / "notes.txt").write_text("the user's")
    build_demo_dataset(out, size=16, train_per_class=4, val_per_class=2, crop_scale=(0.7, 1.0))
    assert all(path.exists() for path in stale)  # the same crops: the references stay valid
    build_demo_dataset(out, size=16, train_per_class=4, val_per_class=2, crop_scale=(0.9, 1.0))
    assert not any(path.exists() for path in stale)
    assert (out / "notes.txt").read_text() == "the user's"


def test_demo_dataset_crop_scale_is_part_of_its_identity(tmp_path):
    # Narrower crops (the demo recipe's) make another dataset: rebuilt, with the range in the manifest's note;
    # the default range keeps the note of datasets built before the option existed.
    import json

    from dip_lightning.core.errors import ConfigError

    out = tmp_path / "demo"
    wide = build_demo_dataset(out, size=16, train_per_class=2, val_per_class=1)
    assert "crop_scale" not in json.loads(
        json.loads(Path(wide["train_manifest"]).read_text())["source"]["note"]
    )
    wide_bytes = (out / "train-000000.tar").read_bytes()
    narrow = build_demo_dataset(out, size=16, train_per_class=2, val_per_class=1, crop_scale=(0.7, 1.0))
    note = json.loads(json.loads(Path(narrow["train_manifest"]).read_text())["source"]["note"])
    assert note["crop_scale"] == [0.7, 1.0]
    assert (out / "train-000000.tar").read_bytes() != wide_bytes
    for bad in ((0.0, 0.5), (0.8, 0.7), (0.5, 1.5)):
        with pytest.raises(ConfigError, match="crop_scale"):
            build_demo_dataset(out, size=16, crop_scale=bad)


def test_demo_rebuild_with_other_settings_says_what_it_replaced(tmp_path, capsys):
    # A data folder built with other crops is rebuilt (its shards and references replaced): the command says so,
    # naming the settings, instead of overwriting it silently.
    from dip_lightning.commands.demo_data import main as demo_data
    from dip_lightning.core.data.demo_dataset import DEFAULT_CROP_SCALE, describe_replaced

    out = tmp_path / "demo"
    first = build_demo_dataset(out, size=16, train_per_class=2, val_per_class=1, crop_scale=(0.5, 1.0))
    assert first["replaced"] == {} and describe_replaced(first) is None
    again = build_demo_dataset(out, size=16, train_per_class=2, val_per_class=1, crop_scale=(0.5, 1.0))
    assert again["replaced"] == {}
    default = build_demo_dataset(out, size=16, train_per_class=2, val_per_class=1)
    assert default["replaced"] == {"crop_scale": ([0.5, 1.0], list(DEFAULT_CROP_SCALE))}
    assert "crop_scale [0.5, 1.0] -> [0.35, 0.9]" in describe_replaced(default)
    capsys.readouterr()
    assert (
        demo_data(
            ["--out", str(out), "--size", "16", "--train_per_class", "3", "--val_per_class", "1"]
            + ["--crop_scale", "[0.35, 0.9]"]
        )
        == 0
    )
    assert "held the demo data built with other settings (train_per_class 2 -> 3)" in capsys.readouterr().out


def test_demo_data_builds_what_the_demo_trains_on(tmp_path, capsys):
    # demo-data built 32 px crops of 35-90% of a photo where demo trains on 64 px crops of 90-100%: the demo then
    # rebuilt the folder demo-data had just prepared.
    from dip_lightning.commands.demo import CROP_SCALE, DEFAULT_CONFIG, config_image_size
    from dip_lightning.commands.demo_data import main as demo_data
    from dip_lightning.core.recipes import resolve_config

    out = tmp_path / "demo"
    assert demo_data(["--out", str(out), "--train_per_class", "2", "--val_per_class", "1"]) == 0
    size = config_image_size(resolve_config(DEFAULT_CONFIG))
    assert f"{size} px in {out}" in capsys.readouterr().out
    again = build_demo_dataset(out, size=size, train_per_class=2, val_per_class=1, crop_scale=CROP_SCALE)
    assert again["replaced"] == {} and not again.get("repaired")


def test_demos_started_together_with_the_same_settings_all_get_the_data(tmp_path):
    # Each process's first look at the folder holds it for a moment: one must not take that for a demo reading it.
    out, go = tmp_path / "demo", tmp_path / "go"
    cmd = [sys.executable, "-m", "tests.helpers.demo_data_holder", str(out), "build", str(go)]
    env = subprocess_env(threads=1)
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(8)  # their imports done: all wait for the start line
    go.touch()
    lines = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert lines == ["BUILT"] * 4, lines


def test_a_damaged_build_is_rebuilt_and_said_so(tmp_path, capsys):
    from dip_lightning.commands.demo_data import main as demo_data
    from dip_lightning.core.data.demo_dataset import DEFAULT_CROP_SCALE, describe_replaced

    out = tmp_path / "demo"
    first = build_demo_dataset(out, **SETTINGS)
    assert first["repaired"] is False
    shard = out / "train-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:1000])  # cut short (a full disk, a killed copy)
    again = build_demo_dataset(out, **SETTINGS)
    assert again["repaired"] is True and again["replaced"] == {} and shard.read_bytes() == whole
    assert describe_replaced(again) == (
        f"{out} held an incomplete or damaged demo build (a shard missing or cut short): rebuilt"
    )
    (out / "val-000000.tar").unlink()
    capsys.readouterr()
    args = ["--out", str(out), "--size", "16", "--train_per_class", "2", "--val_per_class", "1"]
    assert demo_data([*args, "--crop_scale", str(list(DEFAULT_CROP_SCALE))]) == 0  # SETTINGS' crops
    assert "held an incomplete or damaged demo build" in capsys.readouterr().out


def test_a_file_given_as_the_data_folder_is_refused_by_name(tmp_path):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("the user's")
    result = run_command("demo-data", "--out", str(not_a_folder), "--size", "16", cwd=tmp_path)
    assert user_error(result) == (
        f"error: {not_a_folder} is a file: the demo data needs a folder (it is created if missing)"
    )
    assert not_a_folder.read_text() == "the user's"


def test_demo_data_refuses_a_size_of_zero_instead_of_taking_the_default(tmp_path):
    result = run_command("demo-data", "--out", str(tmp_path / "demo"), "--size", "0", cwd=tmp_path)
    assert user_error(result) == "error: size must be >= 8, got 0"
    assert not (tmp_path / "demo" / "train-manifest.json").exists()
