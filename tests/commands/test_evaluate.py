"""``python -m dip_lightning evaluate`` / ``fid-stats``: table, JSON, reference files, shards, ranks."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dip_lightning.__main__ import main as dip_main
from dip_lightning.commands.evaluate import main
from dip_lightning.commands.fid_stats import main as main_fid_stats
from dip_lightning.core.metrics import METRIC_NAMES, compute_metrics
from dip_lightning.core.metrics.features import PixelProjection
from dip_lightning.core.metrics.frechet import StatsAccumulator
from dip_lightning.core.metrics.sources import iter_shard_images
from tests.helpers.metrics import CLASSES, labelled_images, nchw, scipy_fid, smooth_images

torch.set_num_threads(1)
FLAGS = ["--extractor", "pixel-projection", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture()
def real_and_fake(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """60 real and 50 fake images, saved as real.npz and fake.npz in ``tmp_path`` too."""
    real, fake = smooth_images(60, seed=0), smooth_images(50, seed=1, shift=0.15)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    return real, fake


def test_evaluate_prints_a_table_and_writes_the_contract_json(
    tmp_path: Path, real_and_fake: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    _, fake = real_and_fake
    out = tmp_path / "metrics.json"
    cache = ["--cache_dir", str(tmp_path / "cache")]
    argv = [str(tmp_path / "fake.npz"), str(tmp_path / "real.npz"), "--patch_size", "4", "--json", str(out)]
    assert main([*argv, *FLAGS, *cache]) == 0
    printed = capsys.readouterr()
    record = json.loads(out.read_text())
    assert set(METRIC_NAMES) <= set(record) and record["fd_dinov2"] is None
    assert "DINOv2" in record["unavailable"]["fd_dinov2"]
    # The same numbers as the library call on the same images.
    expected = compute_metrics(
        fake, tmp_path / "real.npz", patch_size=4, extractor=PixelProjection(), cache_dir=None
    )
    assert {k: record[k] for k in METRIC_NAMES} == pytest.approx(expected)
    assert record["num_samples"] == 50 and record["patch_size"] == 4
    for label in ("FID", "sFID", "Inception Score", "Precision", "Recall", "Patch seam", "FD-DINOv2"):
        assert label in printed.out
    assert f"{record['fid']:.3f}" in printed.out and "reference: 60 images" in printed.out

    # --metrics picks; --limit cuts the samples; a missing file is a clear error.
    assert main([*argv, "--metrics", "fid", "recall", "--limit", "20", *FLAGS, *cache]) == 0
    record = json.loads(out.read_text())
    assert record["num_samples"] == 20 and record["fid"] is not None and "sfid" not in record
    capsys.readouterr()
    assert dip_main(["evaluate", str(tmp_path / "nope.npz"), str(tmp_path / "real.npz"), *FLAGS]) == 2
    assert "nope.npz not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--metrics", "kid"])


def test_fid_stats_writes_the_full_reference_and_fid_is_evaluate(
    tmp_path: Path, real_and_fake: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    real, fake = real_and_fake
    ref = tmp_path / "ref.npz"
    assert main_fid_stats(["--images", str(tmp_path / "real.npz"), "--out", str(ref), *FLAGS]) == 0
    assert dip_main(["fid-stats", "--images", str(tmp_path / "real.npz"), "--out", str(ref), *FLAGS]) == 2
    assert "--overwrite" in capsys.readouterr().err  # refuses to replace a reference
    with np.load(ref) as npz:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool_features", "seam_cols", "seam_rows"} <= set(npz.files)
        assert int(npz["num_samples"]) == 60 and str(npz["extractor"]) == PixelProjection().name
    # Every metric from the reference file equals the metric from the images themselves.
    out_file, out_images = tmp_path / "a.json", tmp_path / "b.json"
    common = [str(tmp_path / "fake.npz"), "--patch_size", "4", "--no_cache", *FLAGS]
    assert main([common[0], str(ref), *common[1:], "--json", str(out_file)]) == 0
    assert main([common[0], str(tmp_path / "real.npz"), *common[1:], "--json", str(out_images)]) == 0
    a, b = json.loads(out_file.read_text()), json.loads(out_images.read_text())
    assert {k: a[k] for k in METRIC_NAMES if a[k] is not None} == pytest.approx(
        {k: b[k] for k in METRIC_NAMES if b[k] is not None}, rel=1e-9
    )
    # A subset of the metrics is the same numbers.
    subset = [str(tmp_path / "fake.npz"), str(ref), "--metrics", "fid", "inception_score", *FLAGS]
    assert main([*subset, "--json", str(out_file)]) == 0
    record = json.loads(out_file.read_text())
    assert record["fid"] == pytest.approx(a["fid"]) and record["inception_score"] == pytest.approx(
        a["inception_score"]
    )
    extractor = PixelProjection()
    pool = lambda x: extractor(torch.from_numpy(x).permute(0, 3, 1, 2)).float().double().numpy()  # noqa: E731
    assert record["fid"] == pytest.approx(scipy_fid(pool(fake), pool(real)), rel=1e-6)


def _write_shard(path: Path, images: torch.Tensor) -> None:
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for name, payload in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_fid_stats_from_shards_and_rank_split(tmp_path: Path) -> None:
    images = nchw(smooth_images(11, seed=4, size=24))
    _write_shard(tmp_path / "val-000000.tar", images[:6])
    _write_shard(tmp_path / "val-000001.tar", images[6:])
    pattern = str(tmp_path / "val-{000000..000001}.tar")

    streamed = torch.cat(list(iter_shard_images(pattern, batch_size=4, image_size=24)))
    assert torch.equal(streamed, images)  # order kept, lossless PNG round trip
    parts = [
        torch.cat(list(iter_shard_images(pattern, 4, 24, limit=9, rank=r, world_size=2))) for r in range(2)
    ]
    assert parts[0].shape[0] == 5 and parts[1].shape[0] == 4
    assert torch.equal(torch.stack([parts[i % 2][i // 2] for i in range(9)]), images[:9])
    cropped = next(iter_shard_images(pattern, batch_size=2, image_size=16))
    assert cropped.shape == (2, 3, 16, 16)  # other sizes get the ADM centre crop

    out = tmp_path / "ref.npz"
    argv = ["--shards", pattern, "--out", str(out), "--image-size", "24", "--extractor", "pixel-projection"]
    assert main_fid_stats([*argv, "--limit", "10", "--device", "cpu"]) == 0
    acc = StatsAccumulator()
    acc.update(PixelProjection()(images[:10]).float())
    with np.load(out) as npz:
        assert int(npz["num_samples"]) == 10 and int(npz["seam_count"]) == 10
        np.testing.assert_allclose(npz["sigma"], acc.stats().sigma, atol=1e-12)
        assert np.array_equal(npz["pool_labels"], np.arange(10) % 3)  # the shards' cls, in image order
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # no temporary left behind


def test_evaluate_over_seeds_reports_mean_std_and_range(
    tmp_path: Path, real_and_fake: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seeds``: the files ``sample --seeds`` writes, each scored as alone; the metric is their mean."""
    fakes = {seed: smooth_images(30, seed=seed, shift=0.1 * (1 + seed // 30)) for seed in (0, 30, 60)}
    for seed, images in fakes.items():
        np.savez(tmp_path / f"fake_seed{seed}.npz", arr_0=images)
    out = tmp_path / "seeds.json"
    metrics = ["--metrics", "fid", "patch_seam", "--patch_size", "4"]
    argv = [str(tmp_path / "fake.npz"), str(tmp_path / "real.npz"), *metrics, "--json", str(out), *FLAGS]
    assert main([*argv, "--seeds", "0", "30", "60", "--no_cache"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    each = {
        s: compute_metrics(
            images,
            tmp_path / "real.npz",
            metrics=["fid", "patch_seam"],
            patch_size=4,
            extractor=PixelProjection(),
            cache_dir=None,
        )
        for s, images in fakes.items()
    }
    fids = [each[s]["fid"] for s in (0, 30, 60)]
    assert record["per_seed"]["30"]["fid"] == pytest.approx(each[30]["fid"])
    assert record["fid"] == pytest.approx(np.mean(fids))
    stats = record["spread"]["fid"]
    assert stats["std"] == pytest.approx(np.std(fids, ddof=1)) and stats["n"] == 3
    assert (stats["min"], stats["max"]) == pytest.approx((min(fids), max(fids)))
    assert record["seeds"] == [0, 30, 60] and len(record["sample_files"]) == 3
    assert "over 3 seeds (0 30 60)" in printed and "fake_seed60.npz" in printed
    # A seed's missing file is named before any network loads.
    assert dip_main(["evaluate", *argv, "--seeds", "0", "90"]) == 2
    assert "fake_seed90.npz not found" in capsys.readouterr().err


def test_evaluate_scores_class_agreement_of_labelled_samples_against_a_fid_stats_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's route: shards -> fid-stats (labels kept) -> evaluate of a sample npz with arr_1."""
    real, real_labels = labelled_images(6, seed=0)
    with tarfile.open(tmp_path / "val-000000.tar", "w") as tar:
        for i, (img, label) in enumerate(zip(real, real_labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for name, payload in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ref = tmp_path / "ref.npz"
    flags = ["--extractor", "pixel-projection", "--device", "cpu", "--image-size", "16"]
    assert main_fid_stats(["--shards", str(tmp_path / "val-000000.tar"), "--out", str(ref), *flags]) == 0
    fake, labels = labelled_images(5, seed=1)
    np.savez(tmp_path / "fake.npz", arr_0=fake, arr_1=labels)
    np.savez(tmp_path / "wrong.npz", arr_0=fake, arr_1=(labels + 1) % CLASSES)
    expected = compute_metrics(
        fake, tmp_path / "ref.npz", ["class_agreement"], extractor=PixelProjection(), labels=labels
    )
    for name in ("fake", "wrong"):
        out = tmp_path / f"{name}.json"
        argv = [str(tmp_path / f"{name}.npz"), str(ref), "--metrics", "class_agreement", "--json", str(out)]
        assert main([*argv, *FLAGS]) == 0
        record = json.loads(out.read_text())
        assert "Class agreement" in capsys.readouterr().out
        if name == "fake":
            assert (
                record["class_agreement"] == pytest.approx(expected["class_agreement"])
                and record["class_agreement"] >= 0.9
            )
        else:
            assert record["class_agreement"] <= 0.1
