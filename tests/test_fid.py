"""dip_lightning.fid: resize, Fréchet distance, statistics I/O, torchmetrics glue, DDP, commands.

Most tests use `PixelProjection` (a fixed random projection of pixels) as the feature network: the FID
plumbing does not depend on which network produces the features, and Inception costs ~0.5 s per image on one
core. One test runs the real default Inception on a few real photos and noise.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from dip_lightning.fid import (
    FIDHelperInception,
    FIDStats,
    PixelProjection,
    StatsAccumulator,
    TorchmetricsInception,
    TorchScriptInception,
    frechet_distance,
    inception_score,
    iter_npz_images,
    iter_shard_images,
    load_stats,
    main_fid,
    main_fid_stats,
    metric_real_stats,
    resize_bilinear_tf1,
    save_stats,
    set_reference_stats,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------- helpers
def smooth_images(n: int, seed: int, size: int = 16, shift: float = 0.0) -> torch.Tensor:
    """uint8 (n, 3, size, size) images with spatial structure (upsampled low-res noise), seeded."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) + shift
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def numpy_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root: an implementation independent of ours."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Pixel-by-pixel TF1 resize_bilinear(align_corners=False, half_pixel_centers=False), float64."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = y * in_h / out_h
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, in_h - 1)
        dy = sy - y0
        for x in range(out_w):
            sx = x * in_w / out_w
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, in_w - 1)
            dx = sx - x0
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bottom = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            out[y, x] = top * (1 - dy) + bottom * dy
    return out


# ------------------------------------------------------------------------------------------------- resize
def test_tf1_resize_matches_pixel_reference_and_not_torch() -> None:
    # TF1's legacy rule: [0, 1] -> 4 pixels samples at 0, 0.5, 1, 1.5 (clamped) -> 0, 0.5, 1, 1.
    line = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert resize_bilinear_tf1(line, (1, 4)).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]

    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 7, 5, generator=g) * 255
    for size in [(13, 11), (3, 4), (7, 5), (299, 299)]:
        out = resize_bilinear_tf1(img, size)
        assert out.shape == (2, 3, *size)
        if size == (299, 299):
            continue
        ref = tf1_resize_reference(img[1, 2].double().numpy(), *size)
        np.testing.assert_allclose(out[1, 2].numpy(), ref, rtol=0, atol=1e-3)
    # torch's bilinear uses half-pixel centres: a visibly different image (why we implement TF1 ourselves).
    torch_out = torch.nn.functional.interpolate(img, size=(13, 11), mode="bilinear", align_corners=False)
    assert (torch_out - resize_bilinear_tf1(img, (13, 11))).abs().max() > 1.0


# ------------------------------------------------------------------------------------------------- distance
def test_frechet_distance_matches_scipy_self_zero_and_symmetric() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 24, generator=g, dtype=torch.float64)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64) * 0.3
    b = (
        torch.randn(200, 24, generator=g, dtype=torch.float64) @ (torch.eye(24, dtype=torch.float64) + mix)
        + 0.4
    )
    mu_a, s_a = numpy_stats(a)
    mu_b, s_b = numpy_stats(b)

    ours = frechet_distance(mu_a, s_a, mu_b, s_b)
    assert ours == pytest.approx(scipy_fid(mu_a, s_a, mu_b, s_b), rel=1e-9)
    assert ours > 1.0
    assert frechet_distance(mu_b, s_b, mu_a, s_a) == pytest.approx(ours, rel=1e-12)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-9
    # Accepts torch tensors too, and the accumulator's statistics equal numpy's.
    stats = FIDStats.from_features(a)
    np.testing.assert_allclose(stats.mu, mu_a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, s_a, rtol=0, atol=1e-12)
    assert frechet_distance(torch.from_numpy(mu_a), torch.from_numpy(s_a), mu_b, s_b) == pytest.approx(ours)


def test_inception_score_limits() -> None:
    # Confident and spread over K classes -> IS = K; every image the same prediction -> IS = 1.
    assert inception_score(torch.eye(10).repeat(5, 1), splits=5)[0] == pytest.approx(10.0)
    assert inception_score(torch.full((40, 7), 1 / 7), splits=4) == pytest.approx((1.0, 0.0))


# -------------------------------------------------------------------------------------------- torchmetrics
def test_torchmetrics_fid_equals_independent_numpy_computation() -> None:
    extractor = PixelProjection(num_features=16, size=4, seed=3)
    real, fake = smooth_images(64, seed=0), smooth_images(48, seed=1, shift=0.15)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    metric.update(real, real=True)
    metric.update(fake[:20], real=False)  # accumulation over several batches
    metric.update(fake[20:], real=False)
    value = metric.compute()
    assert value.dtype == torch.float64  # float64 features -> float64 result

    f_real, f_fake = extractor(real), extractor(fake)
    assert f_real.shape == (64, 16) and f_real.dtype == torch.float64
    expected = scipy_fid(*numpy_stats(f_real), *numpy_stats(f_fake))
    assert float(value) == pytest.approx(expected, rel=1e-8)
    assert expected > 1.0

    # A set against itself is ~0, and swapping the roles gives the same number.
    metric.reset()  # keeps the real states
    metric.update(real, real=False)
    assert abs(float(metric.compute())) < 1e-8
    swapped = FrechetInceptionDistance(feature=extractor)
    swapped.update(fake, real=True)
    swapped.update(real, real=False)
    assert float(swapped.compute()) == pytest.approx(float(value), rel=1e-9)


def test_reference_stats_loaded_into_metric_reproduce_direct_update() -> None:
    extractor = PixelProjection(num_features=16, size=4, seed=3)
    real, fake = smooth_images(64, seed=0), smooth_images(48, seed=1, shift=0.15)
    direct = FrechetInceptionDistance(feature=extractor)
    direct.update(real, real=True)
    direct.update(fake, real=False)

    stats = FIDStats.from_features(extractor(real), extractor.name)
    loaded = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    set_reference_stats(loaded, stats)
    loaded.update(fake, real=False)
    assert float(loaded.compute()) == pytest.approx(float(direct.compute()), rel=1e-9)
    # Reading the states back gives the statistics that went in.
    back = metric_real_stats(loaded, extractor.name)
    assert back.num_samples == 64
    np.testing.assert_allclose(back.sigma, stats.sigma, rtol=0, atol=1e-10)
    # reset() drops the fake states and keeps the reference.
    loaded.reset()
    assert int(loaded.real_features_num_samples) == 64 and int(loaded.fake_features_num_samples) == 0
    with pytest.raises(ValueError, match="features"):
        set_reference_stats(FrechetInceptionDistance(feature=PixelProjection(num_features=8)), stats)


def _ddp_worker(rank: int, world_size: int, init_file: str, stats_file: str, out_dir: str) -> None:
    """One rank: reference stats on rank 0 only, this rank's half of the fakes, collective compute()."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        extractor = PixelProjection(num_features=16, size=4, seed=3)
        fake = smooth_images(48, seed=1, shift=0.15).tensor_split(world_size)[rank]
        stats = load_stats(stats_file)
        metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        set_reference_stats(metric, stats, global_rank=rank)
        metric.update(fake, real=False)
        value = float(metric.compute())
        # The mistake the rank-0-only loading avoids: every rank loading the statistics counts them twice.
        naive = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        set_reference_stats(naive, stats, global_rank=0)
        naive.update(fake, real=False)
        naive_value = float(naive.compute())
        counted = metric_real_stats(metric).num_samples
        Path(out_dir, f"rank{rank}.txt").write_text(f"{value!r} {naive_value!r} {counted}")
    finally:
        dist.destroy_process_group()


def test_reference_stats_under_two_process_ddp_equal_single_process(tmp_path: Path) -> None:
    extractor = PixelProjection(num_features=16, size=4, seed=3)
    real, fake = smooth_images(64, seed=0), smooth_images(48, seed=1, shift=0.15)
    stats = FIDStats.from_features(extractor(real), extractor.name)
    stats_file = tmp_path / "ref.npz"
    save_stats(stats_file, stats)
    single = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    set_reference_stats(single, load_stats(stats_file))
    single.update(fake, real=False)
    expected = float(single.compute())

    # fork: the children need no re-import (spawn costs ~15 s of imports on this machine). A deadline turns a
    # hung collective into a failure instead of a stuck test run.
    context = mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(stats_file), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two-process FID did not finish within 120 s")
    results = [(tmp_path / f"rank{r}.txt").read_text().split() for r in range(2)]
    for value, naive, counted in results:
        assert float(value) == pytest.approx(expected, rel=1e-9)  # the same on both ranks, = single process
        assert int(counted) == 64  # the reference counted once
        assert float(naive) != pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------- files
def test_stats_io_roundtrip_atomic_no_overwrite_and_adm_layout(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    stats = FIDStats.from_features(torch.randn(50, 6, generator=g), "pixel-projection-test")
    out = tmp_path / "sub" / "ref.npz"
    save_stats(out, stats)
    back = load_stats(out)
    assert back.num_samples == 50 and back.extractor == "pixel-projection-test"
    assert back.mu.dtype == np.float64 and back.sigma.shape == (6, 6)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_stats(out, stats)
    save_stats(out, FIDStats(stats.mu + 1, stats.sigma, 7, "x"), overwrite=True)
    assert load_stats(out).num_samples == 7
    assert sorted(p.name for p in out.parent.iterdir()) == ["ref.npz"]  # no temporary left behind

    adm = tmp_path / "adm.npz"  # ADM reference batches: mu/sigma only
    np.savez(adm, mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    loaded = load_stats(adm)
    assert loaded.num_samples == 0 and loaded.extractor == ""
    metric = FrechetInceptionDistance(feature=PixelProjection(num_features=6))
    set_reference_stats(metric, loaded)  # unknown count still reproduces mu and sigma
    np.testing.assert_allclose(metric_real_stats(metric).sigma, stats.sigma, atol=1e-12)

    with pytest.raises(FileNotFoundError, match="fid-stats"):
        load_stats(tmp_path / "missing.npz")


def test_iter_npz_images_streams_nhwc_and_nchw(tmp_path: Path) -> None:
    images = smooth_images(7, seed=2).permute(0, 2, 3, 1).numpy()  # NHWC like ADM sample files
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez_compressed(tmp_path / "b.npz", arr_0=images.transpose(0, 3, 1, 2))
    for name in ("a.npz", "b.npz"):
        batches = list(iter_npz_images(tmp_path / name, batch_size=3))
        assert [b.shape[0] for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)
    assert sum(b.shape[0] for b in iter_npz_images(tmp_path / "a.npz", 4, limit=5)) == 5


# ------------------------------------------------------------------------------------------------- extractors
def test_missing_weights_raise_errors_that_say_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pt"))):
        FIDHelperInception(path=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt.*nvlabs"):
        TorchScriptInception(str(tmp_path / "inception-2015-12-05.pt"))
    # torch-fidelity is not installed here; with it, a missing weights file names the file and TORCH_HOME.
    with pytest.raises(
        (ModuleNotFoundError, FileNotFoundError), match="weights-inception-2015-12-05-6726825d"
    ):
        TorchmetricsInception()


class _StandInInception(torch.nn.Module):
    """Same call signature as the StyleGAN2-ADA/EDM TorchScript Inception (uint8 in, any size)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, 2048, generator=g), requires_grad=False)
        self.fc = torch.nn.Parameter(torch.randn(2048, 10, generator=g) * 0.05, requires_grad=False)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        assert img.dtype == torch.uint8
        x = torch.nn.functional.adaptive_avg_pool2d(img.float() / 255.0, 4).flatten(1)
        features = torch.relu(x @ self.proj)
        if return_features:
            return features
        return torch.softmax(features @ self.fc, dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_torchscript_inception_wrapper_with_a_scripted_stand_in(tmp_path: Path) -> None:
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    extractor = TorchScriptInception(str(path))
    assert extractor.name == "torchscript:inception-2015-12-05.pt" and extractor.has_classifier
    images = smooth_images(6, seed=0, size=20)
    features = extractor(images)
    assert features.shape == (6, 2048) and features.dtype == torch.float64
    probs = extractor.class_probabilities(images)
    torch.testing.assert_close(probs.sum(1), torch.ones(6, dtype=torch.float64))
    assert inception_score(probs, splits=2)[0] >= 1.0
    with pytest.raises(TypeError, match="uint8"):
        extractor(images.float())
    extractor.train()
    assert not extractor.training  # never leaves eval mode


def test_default_inception_features_separate_real_photos_from_noise() -> None:
    from skimage import data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        arr = getattr(data, name)()
        side = min(arr.shape[:2])
        crop = Image.fromarray(arr[:side, :side, :3]).resize((64, 64), Image.BICUBIC)
        photos.append(np.asarray(crop))
    real = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    extractor = FIDHelperInception()
    assert extractor.num_features == 2048 and not extractor.has_classifier
    f = extractor(torch.cat([real, noise]))
    assert f.shape == (8, 2048) and f.dtype == torch.float64 and torch.isfinite(f).all()
    f_real, f_noise = f[:4], f[4:]
    # Pool3 features are post-ReLU averages; a trained net puts noise far from photos, and photos apart.
    assert (f >= 0).all()
    between = torch.cdist(f_real, f_noise).mean()
    within_noise = torch.cdist(f_noise, f_noise).sum() / 12
    assert between > 2 * within_noise
    assert torch.cdist(f_real, f_real).sum() / 12 > within_noise  # photos differ more than noise samples do

    # The wrapper = TF1 resize + (v - 128) / 128 + the TorchScript net.
    manual = extractor.net((resize_bilinear_tf1(real[:1].float(), (299, 299)) - 128) / 128)
    torch.testing.assert_close(f_real[:1], manual.double())


# ------------------------------------------------------------------------------------------------- commands
def _write_images_npz(path: Path, images: torch.Tensor) -> None:
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())


def test_fid_stats_and_fid_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real, fake = smooth_images(60, seed=0), smooth_images(50, seed=1, shift=0.15)
    real_npz, fake_npz, ref = tmp_path / "real.npz", tmp_path / "fake.npz", tmp_path / "ref.npz"
    _write_images_npz(real_npz, real)
    _write_images_npz(fake_npz, fake)
    flags = ["--extractor", "pixel-projection", "--batch-size", "16", "--device", "cpu"]

    assert main_fid_stats(["--images", str(real_npz), "--out", str(ref), *flags]) == 0
    assert main_fid_stats(["--images", str(real_npz), "--out", str(ref), *flags]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main_fid_stats(["--images", str(real_npz), "--out", str(ref), "--overwrite", *flags]) == 0
    stats = load_stats(ref)
    extractor = PixelProjection()
    assert stats.num_samples == 60 and stats.extractor == extractor.name
    np.testing.assert_allclose(stats.mu, extractor(real).mean(0).numpy(), atol=1e-12)

    capsys.readouterr()
    assert main_fid([str(fake_npz), str(ref), *flags]) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"FID: ([0-9.eE+-]+)", out).group(1))
    expected = scipy_fid(*numpy_stats(extractor(fake)), *numpy_stats(extractor(real)))
    assert printed == pytest.approx(expected, abs=1e-4)
    assert "samples: 50" in out and "reference: 60" in out and extractor.name in out
    assert "IS: unavailable" in out

    # A reference given as images is reduced to statistics first; a set against itself is ~0.
    assert main_fid([str(real_npz), str(real_npz), *flags]) == 0
    assert abs(float(re.search(r"FID: ([0-9.eE+-]+)", capsys.readouterr().out).group(1))) < 1e-4


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
    images = smooth_images(11, seed=4, size=24)
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
    acc.update(PixelProjection()(images[:10]))
    expected = acc.stats()
    stats = load_stats(out)
    assert stats.num_samples == 10
    np.testing.assert_allclose(stats.sigma, expected.sigma, atol=1e-12)
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))
