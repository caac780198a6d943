"""An npz's image array is checked from its header before any image is read: layout, the per-image limits, the
bytes the zip member really holds, and the reference's image size. A 3 MB npz can declare gigabytes of zeros."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.core.data.preprocess import ImageLimits, ImageTooLarge
from dip_lightning.core.metrics.patch_seam import SeamProfile
from dip_lightning.core.metrics.reference import (
    FeatureSet,
    load_reference,
    npz_feature_set,
    reference_image_size,
    save_reference,
)
from dip_lightning.core.metrics.sources import BadImageArray, iter_npz_images, npz_images
from tests.helpers.memory import run_command_measured

torch.set_num_threads(1)


def forged_npz(path: Path, shape: tuple[int, ...], data_bytes: int | None = None) -> Path:
    """An npz whose ``arr_0`` header declares ``shape`` (uint8), followed by ``data_bytes`` zero bytes (default: as
    many as declared), deflated while written: gigabytes declared cost megabytes on disk and no memory here."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    remaining = int(np.prod(shape)) if data_bytes is None else data_bytes
    chunk = bytes(16 << 20)
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        zf.open("arr_0.npy", "w", force_zip64=True) as f,
    ):
        f.write(header.getvalue())
        while remaining > 0:
            f.write(chunk[: min(remaining, len(chunk))])
            remaining -= len(chunk)
    return path


def image_npz(path: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(size)
    np.savez(path, arr_0=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return path


def test_a_header_declaring_more_than_the_file_holds_is_refused_unread(tmp_path: Path) -> None:
    path = forged_npz(tmp_path / "forged.npz", (16, 8000, 8000, 3), data_bytes=1000)
    assert path.stat().st_size < 10_000
    message = r"declares \(16, 8000, 8000, 3\) \(3072000000 bytes\) but the file holds 1000 bytes"
    with pytest.raises(BadImageArray, match=message):
        npz_images(path)
    with pytest.raises(BadImageArray, match=message):
        next(iter_npz_images(path, batch_size=16))


def test_images_beyond_the_limits_are_refused_from_the_header(tmp_path: Path) -> None:
    bomb = forged_npz(tmp_path / "bomb.npz", (1, 7100, 7100, 3))  # 50.4 M pixels, every byte present
    with pytest.raises(ImageTooLarge, match=r"bomb.npz:arr_0: each image of 7100x7100 = 50410000 pixels"):
        npz_images(bomb)
    small = image_npz(tmp_path / "small.npz", 2, 16)
    assert npz_images(small).size == (16, 16) and npz_images(small).count == 2
    with pytest.raises(ImageTooLarge, match="16x16 = 256 pixels"):
        next(iter_npz_images(small, batch_size=2, limits=ImageLimits(max_pixels=255)))
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(BadImageArray, match="must be a C-order uint8"):
        npz_images(tmp_path / "floats.npz")


def test_samples_of_another_size_than_the_reference_are_refused_before_reading(tmp_path: Path) -> None:
    reference = image_npz(tmp_path / "ref.npz", 4, 8)
    samples = image_npz(tmp_path / "samples.npz", 4, 16)
    assert reference_image_size(reference) == (8, 8)
    ref = load_reference(reference, ["patch_seam"], None, torch.device("cpu"), use_cache=False)
    assert ref.image_size == (8, 8)
    with pytest.raises(
        BadImageArray, match=r"samples.npz:arr_0 holds 16x16 images but the reference's are 8x8"
    ):
        npz_feature_set(samples, {"seam"}, None, torch.device("cpu"), image_size=ref.image_size)
    same = npz_feature_set(reference, {"seam"}, None, torch.device("cpu"), image_size=(8, 8))
    assert same.num_images == 4
    # A statistics file tells its image size through its seam profile.
    stats = tmp_path / "stats.npz"
    pool = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    save_reference(stats, FeatureSet(features={"pool": pool}, seam=SeamProfile.empty(6, 10)))
    assert reference_image_size(stats) == (6, 10)
    assert load_reference(stats, ["patch_seam"], None, torch.device("cpu")).image_size == (6, 10)


@pytest.mark.slow
def test_evaluate_refuses_a_forged_sample_file_before_reading_it(tmp_path: Path) -> None:
    """The issue's case through the command: an npz of 4 x 4000 x 4000 zeros (800 KB on disk, 192 MB declared;
    the patch-seam pass would hold it as float64: 1.5 GB) against a 32 px reference."""
    samples = forged_npz(tmp_path / "samples.npz", (4, 4000, 4000, 3))
    reference = image_npz(tmp_path / "ref.npz", 8, 32)
    args = ["--metrics", "patch_seam", "--patch_size", "8", "--no_cache", "--device", "cpu"]
    result, peak_mb = run_command_measured("evaluate", str(samples), str(reference), *args, timeout=300)
    assert result.returncode != 0
    assert "samples.npz:arr_0 holds 4000x4000 images but the reference's are 32x32" in result.stderr
    assert peak_mb < 700, f"evaluate peaked at {peak_mb:.0f} MB"


def test_reference_statistics_are_checked_from_their_headers(tmp_path: Path, monkeypatch) -> None:
    from dip_lightning.core.metrics import reference as reference_module

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (50000, 50000)}
    )
    forged = tmp_path / "forged_stats.npz"
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("mu.npy", _npy(np.zeros(50000)))
        zf.writestr("sigma.npy", header.getvalue() + bytes(64))  # declares 20 GB, holds 64 bytes
    with pytest.raises(
        reference_module.BadReferenceFile, match="'sigma' declares 20000000000 bytes but the file"
    ):
        load_reference(forged, ["fid"], None, torch.device("cpu"))
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(40), sigma=np.eye(40))
    assert load_reference(stats, ["fid"], None, torch.device("cpu")).stats["pool"].mu.shape == (40,)
    monkeypatch.setattr(reference_module, "MAX_STATISTICS_BYTES", 1000)
    with pytest.raises(
        reference_module.BadReferenceFile, match="'sigma' declares 12800 bytes, more than any"
    ):
        load_reference(stats, ["fid"], None, torch.device("cpu"))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
