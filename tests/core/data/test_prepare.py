"""The shard tool on a real folder of odd inputs: labels, bad files, formats, resume after SIGKILL."""

from __future__ import annotations

import filecmp
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dip_lightning.core.data.prepare import prepare_split
from dip_lightning.core.data.preprocess import center_crop_arr, to_rgb
from dip_lightning.core.data.shards import expand_shards, iter_shard_samples
from dip_lightning.core.data.streams import iter_image_batches
from tests.helpers import REPO

SIZE = 16
BAD = {"b_dog/empty.jpg", "b_dog/truncated.jpg", "c_fish/notes.txt"}


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """ImageFolder with three classes and the inputs ImageNet-scale data throws at a converter."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    labels: dict[str, int] = {}
    for c, cls in enumerate(("a_cat", "b_dog", "c_fish")):
        for i in range(5):
            rel = f"{cls}/{cls}_{i}.jpg"
            _save(rgb(40 + 3 * i, 30 + 5 * i), root / rel, "JPEG", quality=90)
            labels[rel] = c
    odd = {
        "a_cat/cmyk.jpg": (rgb(33, 21).convert("CMYK"), "JPEG"),
        "a_cat/grey.png": (rgb(25, 40).convert("L"), "PNG"),
        "b_dog/rgba.png": (rgb(30, 30).convert("RGBA"), "PNG"),
        "b_dog/tiny.png": (rgb(5, 3), "PNG"),
        "c_fish/palette.gif": (rgb(20, 20).convert("P"), "GIF"),
        "c_fish/sub/nested.png": (rgb(18, 18), "PNG"),  # ImageFolder is recursive inside a class
    }
    for rel, (img, fmt) in odd.items():
        _save(img, root / rel, fmt)
        labels[rel] = "abc".index(rel[0])
    (root / "b_dog/empty.jpg").write_bytes(b"")
    full = io.BytesIO()
    rgb(64, 48).save(full, format="JPEG")
    (root / "b_dog/truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "c_fish/notes.txt").write_text("not an image\n")
    (root / "c_fish/.DS_Store").write_bytes(b"\0\0")  # hidden files are ignored, not reported
    return root, labels


def _samples(out: Path, split: str = "train") -> dict[str, tuple[dict, str]]:
    found = {}
    for url in expand_shards(str(out / f"{split}-*.tar")):
        for key, sample in iter_shard_samples(url):
            found[key] = (sample, url)
    return found


def _source_of(key: str, labels: dict[str, int]) -> str:
    stem = key.split("_", 1)[1]
    (match,) = [rel for rel in labels if os.path.basename(rel).split(".")[0].replace(".", "_") == stem]
    return match


def test_png_shards_round_trip_labels_and_pixels(odd_folder, tmp_path):
    src, labels = odd_folder
    manifest = prepare_split(src, tmp_path, image_size=SIZE, shard_size=4, workers=1, progress=False)
    assert manifest["num_samples"] == len(labels) == 21
    assert {b["path"] for b in manifest["bad_files"]} == BAD and manifest["num_bad"] == 3
    assert manifest["class_counts"] == {"a_cat": 7, "b_dog": 7, "c_fish": 7}
    assert (tmp_path / "classes.txt").read_text().split() == ["a_cat", "b_dog", "c_fish"]
    assert [s["name"] for s in manifest["shards"]] == [f"train-{k:06d}.tar" for k in range(6)]
    assert sum(s["samples"] for s in manifest["shards"]) == 21
    saved = json.loads((tmp_path / "train-manifest.json").read_text())
    assert saved["shards"] == manifest["shards"] and saved["preprocess"] == "adm"

    samples = _samples(tmp_path)
    assert len(samples) == 21
    for key, (sample, _) in samples.items():
        rel = _source_of(key, labels)
        assert int(sample["cls"]) == labels[rel], rel
        expected = center_crop_arr(to_rgb(Image.open(src / rel)), SIZE)
        got = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert got.shape == (SIZE, SIZE, 3) and np.array_equal(got, expected), rel
    # a stock webdataset pipeline reads the same samples and labels
    import webdataset as wds

    urls = expand_shards(str(tmp_path / "train-*.tar"))
    pipeline = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode("rgb8")
    pipeline = pipeline.to_tuple("png", "cls")
    via_wds = [(img.shape, int(cls)) for img, cls in pipeline]
    assert sorted(c for _, c in via_wds) == sorted(labels.values())
    assert all(shape == (SIZE, SIZE, 3) for shape, _ in via_wds)
    # shards are globally shuffled: the first shard is not one class in folder order
    first = [int(s["cls"]) for s, url in samples.values() if url.endswith("train-000000.tar")]
    assert len(set(first)) > 1 or first != sorted(first)


def test_orig_keeps_bytes_and_is_cropped_at_load(odd_folder, tmp_path):
    src, labels = odd_folder
    manifest = prepare_split(src, tmp_path, image_size=SIZE, format="orig", workers=2, progress=False)
    assert manifest["crop_at_load"] and manifest["num_bad"] == 3
    samples = _samples(tmp_path)
    for key, (sample, _) in samples.items():
        rel = _source_of(key, labels)
        ext = next(e for e in ("jpg", "png") if e in sample)
        if rel.endswith(".gif"):  # exotic formats are stored as lossless PNG of the full image
            assert ext == "png"
        else:
            assert sample[ext] == (src / rel).read_bytes(), rel
    # the loader applies the ADM crop: same pixels as the png route
    by_label: dict[int, list[np.ndarray]] = {}
    for x, y in iter_image_batches(str(tmp_path / "train-*.tar"), batch_size=8, image_size=SIZE):
        assert x.shape[1:] == (3, SIZE, SIZE)
        for img, label in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist()):
            by_label.setdefault(label, []).append(img)
    expected: dict[int, list[np.ndarray]] = {}
    for rel, label in labels.items():
        expected.setdefault(label, []).append(center_crop_arr(to_rgb(Image.open(src / rel)), SIZE))
    for label, imgs in expected.items():  # same multiset of crops per class
        key = sorted(a.tobytes() for a in imgs)
        assert sorted(a.tobytes() for a in by_label[label]) == key


def test_jpg_shards_and_flat_val_with_label_file(odd_folder, tmp_path):
    src, labels = odd_folder
    prepare_split(src, tmp_path, image_size=SIZE, format="jpg", quality=90, workers=1, progress=False)
    assert all("jpg" in s for s, _ in _samples(tmp_path).values())
    # flat validation folder + ImageNet-style CSV (header line, synset first in the second column)
    flat = tmp_path / "valsrc"
    flat.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, cls in enumerate(["c_fish", "a_cat", "b_dog", "a_cat"]):
        Image.new("RGB", (20 + i, 20), (10 * i, 0, 0)).save(flat / f"val_{i:04d}.JPEG")
        rows.append(f"val_{i:04d},{cls} 1 2 3 4")
    Image.new("RGB", (20, 20)).save(flat / "unlabelled.JPEG")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    manifest = prepare_split(
        flat, tmp_path, split="val", image_size=SIZE, labels=tmp_path / "val.csv", workers=1, progress=False
    )
    assert manifest["num_samples"] == 4 and [b["path"] for b in manifest["bad_files"]] == ["unlabelled.JPEG"]
    got = {k.split("_", 1)[1]: int(s["cls"]) for k, (s, _) in _samples(tmp_path, "val").items()}
    assert got == {"val_0000": 2, "val_0001": 0, "val_0002": 1, "val_0003": 0}  # indices from classes.txt


def test_other_configuration_in_same_folder_is_refused(odd_folder, tmp_path):
    src, _ = odd_folder
    prepare_split(src, tmp_path, image_size=SIZE, shard_size=8, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="another source or configuration"):
        prepare_split(src, tmp_path, image_size=SIZE, shard_size=5, workers=1, progress=False)
    m = prepare_split(src, tmp_path, image_size=SIZE, shard_size=5, workers=1, progress=False, overwrite=True)
    assert m["num_shards"] == 5 and len(list(tmp_path.glob("train-*.tar"))) == 5


def _make_slow_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))
        _save(img, root / f"k{i % 2}" / f"img_{i:03d}.jpg", "JPEG", quality=80)


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_shards(tmp_path):
    src = tmp_path / "src"
    _make_slow_folder(src, 48)
    (src / "k1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    args = ["--src", str(src), "--size", "128", "--png-level", "9", "--shard-size", "4", "--quiet"]
    cmd = [sys.executable, "-m", "dip_lightning", "prepare", *args, "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=REPO, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("train-*.tar")) and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup handler runs
    proc.wait()
    complete = sorted(p.name for p in out.glob("train-*.tar"))
    assert 1 <= len(complete) < 13, "the run should have been killed part-way"
    assert not (out / "train-manifest.json").exists()
    # every file with a final name is a complete shard: readable to the end with 4 samples (or 3 + broken)
    for name in complete:
        n = sum(1 for _ in iter_shard_samples(str(out / name)))
        assert n in (3, 4)

    resumed = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 skipped" in resumed.stdout and "broken.jpg" in resumed.stdout
    reference = tmp_path / "ref"
    prepare_split(src, reference, image_size=128, png_level=9, shard_size=4, workers=2, progress=False)
    names = sorted(p.name for p in reference.glob("train-*.tar"))
    assert names == sorted(p.name for p in out.glob("train-*.tar")) and len(names) == 13
    for name in names:
        assert filecmp.cmp(out / name, reference / name, shallow=False), name
    assert not list(out.glob("*.tmp"))
    m_out = json.loads((out / "train-manifest.json").read_text())
    m_ref = json.loads((reference / "train-manifest.json").read_text())
    assert m_out["shards"] == m_ref["shards"] and m_out["num_bad"] == m_ref["num_bad"] == 1


def test_cli_reports_errors_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dip_lightning", "prepare", "--src", str(tmp_path / "missing")]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "is not a folder" in res.stderr
