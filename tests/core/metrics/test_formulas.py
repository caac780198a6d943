"""Each metric of dip_lightning.core.metrics against an independent computation on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dip_lightning.core.metrics.errors import MetricsError
from dip_lightning.core.metrics.frechet import FIDStats, StatsAccumulator, frechet_distance
from dip_lightning.core.metrics.inception_score import ADM_SPLIT_SIZE, inception_score, inception_score_splits
from dip_lightning.core.metrics.patch_seam import SeamProfile, patch_seam_score, seam_ratio
from dip_lightning.core.metrics.precision_recall import manifold_radii, precision_recall, realism_scores
from tests.helpers.metrics import brute_force_pr, scipy_fid

torch.set_num_threads(1)


def test_fid_matches_scipy_zero_for_itself_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    sa, sb = FIDStats.from_features(a), FIDStats.from_features(b)
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-9)
    assert frechet_distance(sb.mu, sb.sigma, sa.mu, sa.sigma) == pytest.approx(ours, rel=1e-9)
    assert abs(frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma)) < 1e-9
    # Streaming accumulation in uneven batches gives numpy's mean and unbiased covariance.
    acc = StatsAccumulator()
    for part in np.array_split(a, 7):
        acc.update(torch.from_numpy(part))
    np.testing.assert_allclose(acc.stats().sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)


def test_precision_recall_match_brute_force_knn() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(120, 8))
    samples = rng.normal(size=(90, 8)) * 0.7 + 0.8  # overlapping, shifted, narrower: 0 < P, R < 1
    expected = brute_force_pr(ref, samples)
    assert 0.05 < expected[0] < 0.98 and 0.05 < expected[1] < 0.98
    assert precision_recall(ref, samples, dtype=torch.float64) == pytest.approx(expected, abs=1e-12)
    # Row blocks smaller than the set (the batched path) change nothing.
    assert precision_recall(ref, samples, block_size=16, dtype=torch.float64) == pytest.approx(expected)
    # float32 (the default) may flip only points within rounding of a ball's surface: none here.
    assert precision_recall(ref, samples) == pytest.approx(expected)
    # radii are squared k-th neighbour distances, self excluded
    d = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    np.testing.assert_allclose(
        manifold_radii(ref, dtype=torch.float64).numpy(), np.sort(d, 1)[:, 3], rtol=1e-9
    )


def test_realism_scores_match_the_explicit_definition_and_precision() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(60, 5))
    samples = np.concatenate([rng.normal(size=(40, 5)) * 0.8 + 1.0, ref[:2]])  # two samples on references
    distances = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    radii = np.sort(distances, axis=1)[:, 3]
    for keep in (1.0, 0.5):
        kept = np.argsort(radii, kind="stable")[: round(keep * len(ref))]
        expected = [
            max(
                radii[r] / np.sqrt(((s - ref[r]) ** 2).sum()) if (s != ref[r]).any() else np.inf for r in kept
            )
            for s in samples
        ]
        ours = realism_scores(ref, samples, keep=keep, dtype=torch.float64).numpy()
        on_reference = np.isinf(expected)  # distance 0, up to the rounding of |a|^2 - 2ab + |b|^2
        assert (ours[on_reference] > 1e6).all()
        np.testing.assert_allclose(ours[~on_reference], np.asarray(expected)[~on_reference], rtol=1e-9)
    scores = realism_scores(ref, samples, dtype=torch.float64)
    assert (scores[-2:] > 1e6).all()
    precision = precision_recall(ref, samples, dtype=torch.float64)[0]
    assert 0.1 < precision < 0.95
    assert float((scores >= 1).double().mean()) == pytest.approx(precision, abs=1e-12)
    with pytest.raises(MetricsError, match="keep must be in"):
        realism_scores(ref, samples, keep=0.0)


def test_precision_recall_extremes_and_too_few_points() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(50, 4))
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(ref[:3], ref)


def test_inception_score_formula_and_adm_splits() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(12000, 10)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def formula(p: np.ndarray) -> float:
        marginal = p.mean(0, keepdims=True)
        return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))

    splits = inception_score_splits(probs)
    assert ADM_SPLIT_SIZE == 5000 and len(splits) == 3  # 5000, 5000, 2000 images
    expected = [formula(probs[:5000]), formula(probs[5000:10000]), formula(probs[10000:])]
    assert splits == pytest.approx(expected, rel=1e-12)
    assert inception_score(probs) == pytest.approx(np.mean(expected), rel=1e-12)
    # Limits: one confident class for every image -> 1; uniform over K distinct confident classes -> K.
    eye = np.eye(10)
    assert inception_score(np.tile(eye[:1], (100, 1))) == pytest.approx(1.0)
    assert inception_score(np.tile(eye, (10, 1))) == pytest.approx(10.0)


def _images_with_seams(n: int, size: int, patch: int, seam: float, seed: int) -> torch.Tensor:
    """Smooth random images plus a per-patch constant offset of amplitude ``seam`` (blocking artefacts)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False) * 0.8 + 0.1
    blocks = torch.rand(n, 3, size // patch, size // patch, generator=g) - 0.5
    x = x + seam * blocks.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_patch_seam_one_without_seams_above_one_with_them() -> None:
    clean = SeamProfile.of_images(_images_with_seams(16, 32, 8, 0.0, seed=0))
    clean_b = SeamProfile.of_images(_images_with_seams(16, 32, 8, 0.0, seed=1))
    seamy = SeamProfile.of_images(_images_with_seams(16, 32, 8, 0.2, seed=1))
    assert patch_seam_score(clean_b, clean, 8) == pytest.approx(1.0, abs=0.15)
    assert patch_seam_score(seamy, clean, 8) > 3.0
    # Seams on a 8-px grid do not show on a grid they are not on (5 px): no boundary excess there.
    assert patch_seam_score(seamy, clean, 5) < patch_seam_score(seamy, clean, 8) / 2


def test_patch_seam_profile_is_the_explicit_boundary_ratio_and_adds_up() -> None:
    images = _images_with_seams(6, 16, 4, 0.1, seed=2)
    x = images.double().numpy() / 255
    dx = (x[..., 1:] - x[..., :-1]) ** 2  # gap j between columns j and j+1
    dy = (x[..., 1:, :] - x[..., :-1, :]) ** 2
    boundary = (np.arange(1, 16) % 4) == 0
    b = np.concatenate([dx[..., boundary].ravel(), dy[..., boundary, :].ravel()])
    i = np.concatenate([dx[..., ~boundary].ravel(), dy[..., ~boundary, :].ravel()])
    profile = SeamProfile.of_images(images)
    assert seam_ratio(profile, 4) == pytest.approx(b.mean() / i.mean(), rel=1e-12)
    halves = SeamProfile.of_images(images[:2]) + SeamProfile.of_images(images[2:])
    assert seam_ratio(halves, 4) == pytest.approx(seam_ratio(profile, 4), rel=1e-12)
    with pytest.raises(ValueError, match="patch grid must line up"):
        patch_seam_score(profile, SeamProfile.of_images(_images_with_seams(2, 32, 4, 0, 0)), 4)
    with pytest.raises(ValueError, match="no boundary"):
        seam_ratio(profile, 16)
