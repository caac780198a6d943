"""compute_metrics, references of every layout, the content-hash cache, FD-DINOv2 and two-process extraction.

The feature network here is `PixelProjection` (fixed random projections of pixels): the engine does not depend
on which network gives the features, and Inception costs ~0.35 s per image on one core. tests/core/metrics/
test_known_sets.py runs the real Inception on the demo's photos.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dip_lightning.core.encoders import DINOv2ViT
from dip_lightning.core.metrics import METRIC_NAMES, MetricEngine, MetricUnavailableWarning, compute_metrics
from dip_lightning.core.metrics import reference as reference_module
from dip_lightning.core.metrics.features import DINOv2Features, PixelProjection
from dip_lightning.core.metrics.frechet import FIDStats, frechet_distance
from dip_lightning.core.metrics.patch_seam import SeamProfile, patch_seam_score
from dip_lightning.core.metrics.precision_recall import precision_recall
from dip_lightning.core.metrics.reference import FeatureSet, save_reference
from tests.helpers.metrics import brute_force_pr, nchw, run_two_forked_processes, scipy_fid, smooth_images

torch.set_num_threads(1)
# The sets here carry no labels: class agreement has its own tests (test_class_agreement.py).
ALL_BUT_DINO_AND_LABELS = [m for m in METRIC_NAMES if m not in ("fd_dinov2", "class_agreement")]


@pytest.fixture()
def sets(tmp_path: Path) -> dict:
    real, fake = smooth_images(60, seed=0), smooth_images(40, seed=1, shift=0.2)
    np.savez(tmp_path / "real.npz", arr_0=real)
    return {"real": real, "fake": fake, "ref": tmp_path / "real.npz", "cache": tmp_path / "cache"}


def independent(real: np.ndarray, fake: np.ndarray, extractor: PixelProjection, patch: int) -> dict:
    """Every metric from the extractor's features with independent formulas (tests.helpers.metrics)."""
    fr = extractor.features(nchw(real), ("pool", "spatial"))
    ff = extractor.features(nchw(fake), ("pool", "spatial", "probs"))
    # float32 features, as the engine keeps them (the ADM evaluator's activations are float32 too)
    fr = {k: v.float().double().numpy() for k, v in fr.items()}
    ff = {k: v.float().double().numpy() for k, v in ff.items()}
    p = ff["probs"]
    is_ = float(np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()))
    precision, recall = brute_force_pr(fr["pool"], ff["pool"])
    seam = patch_seam_score(SeamProfile.of_images(nchw(fake)), SeamProfile.of_images(nchw(real)), patch)
    return {
        "fid": scipy_fid(ff["pool"], fr["pool"]),
        "sfid": scipy_fid(ff["spatial"], fr["spatial"]),
        "inception_score": is_,
        "precision": precision,
        "recall": recall,
        "patch_seam": seam,
    }


def test_compute_metrics_equals_independent_computation(sets: dict) -> None:
    extractor = PixelProjection()
    with pytest.warns(MetricUnavailableWarning, match="fd_dinov2: not computed: no DINOv2"):
        got = compute_metrics(
            sets["fake"], sets["ref"], patch_size=4, extractor=extractor, cache_dir=sets["cache"]
        )
    assert list(got) == list(METRIC_NAMES) and got["fd_dinov2"] is None
    expected = independent(sets["real"], sets["fake"], extractor, 4)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert 0 < got["precision"] < 1 and 0 < got["recall"] <= 1
    # Only the metrics asked for; patch_seam without a patch size is None with its reason.
    with pytest.warns(MetricUnavailableWarning, match="patch_seam: not computed: no patch size"):
        some = compute_metrics(
            sets["fake"], sets["ref"], ["fid", "patch_seam"], extractor=extractor, cache_dir=sets["cache"]
        )
    assert some == {"fid": pytest.approx(got["fid"]), "patch_seam": None}
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(sets["fake"], sets["ref"], ["fid", "kid"], extractor=extractor)
    with pytest.raises(ValueError, match="uint8"):
        compute_metrics(sets["fake"].astype(np.float32), sets["ref"], ["fid"], extractor=extractor)


def test_reference_features_are_cached_by_content_hash(sets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    extractor = PixelProjection()
    calls: list[tuple[str, ...]] = []
    original = reference_module.npz_feature_set

    def counting(path, kinds, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(tuple(sorted(kinds)))
        return original(path, kinds, *args, **kwargs)

    monkeypatch.setattr(reference_module, "npz_feature_set", counting)
    first = compute_metrics(
        sets["fake"], sets["ref"], ALL_BUT_DINO_AND_LABELS, 4, extractor=extractor, cache_dir=sets["cache"]
    )
    assert calls == [("pool", "seam", "spatial")]
    second = compute_metrics(
        sets["fake"], sets["ref"], ALL_BUT_DINO_AND_LABELS, 4, extractor=extractor, cache_dir=sets["cache"]
    )
    assert calls == [("pool", "seam", "spatial")] and second == first  # nothing extracted again
    # Another name for the same bytes hits the cache; changed bytes do not.
    copy = sets["ref"].with_name("copy.npz")
    copy.write_bytes(sets["ref"].read_bytes())
    assert compute_metrics(sets["fake"], copy, ["fid"], extractor=extractor, cache_dir=sets["cache"]) == {
        "fid": first["fid"]
    }
    assert len(calls) == 1
    np.savez(copy, arr_0=sets["real"][:50])
    compute_metrics(sets["fake"], copy, ["fid"], extractor=extractor, cache_dir=sets["cache"])
    assert calls[-1] == ("pool",) and len(calls) == 2
    # Another extractor has its own cache entries.
    compute_metrics(
        sets["fake"], sets["ref"], ["fid"], extractor=PixelProjection(seed=5), cache_dir=sets["cache"]
    )
    assert len(calls) == 3


def test_kit_reference_file_adm_batch_and_old_fid_only_file(sets: dict, tmp_path: Path) -> None:
    extractor = PixelProjection()
    from_images = compute_metrics(
        sets["fake"], sets["ref"], ALL_BUT_DINO_AND_LABELS, 4, extractor=extractor, cache_dir=None
    )

    # The kit's reference file (what fid-stats writes) gives the same numbers as the images themselves.
    real = nchw(sets["real"])
    feats = {k: v.float().numpy() for k, v in extractor.features(real, ("pool", "spatial")).items()}
    full = FeatureSet(feats, SeamProfile.of_images(real), len(real), extractor.name)
    kit = tmp_path / "kit.npz"
    save_reference(kit, full)
    with pytest.raises(FileExistsError):
        save_reference(kit, full)
    from_file = compute_metrics(
        sets["fake"], kit, ALL_BUT_DINO_AND_LABELS, 4, extractor=extractor, cache_dir=None
    )
    assert from_file == pytest.approx(from_images, rel=1e-9)
    # It records its extractor: another one is an error, not a silent mix of feature spaces.
    with pytest.raises(ValueError, match="computed with extractor"):
        compute_metrics(sets["fake"], kit, ["fid"], extractor=PixelProjection(seed=1))

    # ADM reference batch: images plus statistics over a larger set; FID/sFID use the stored ones (as ADM).
    shifted = FIDStats.from_features(feats["pool"] + 1.0)
    adm = tmp_path / "VIRTUAL_test_labeled.npz"
    spatial = FIDStats.from_features(feats["spatial"])
    np.savez(
        adm, arr_0=sets["real"], mu=shifted.mu, sigma=shifted.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma
    )
    with pytest.warns(UserWarning, match="records no extractor"):
        got = compute_metrics(
            sets["fake"], adm, ALL_BUT_DINO_AND_LABELS, 4, extractor=extractor, cache_dir=None
        )
    fake_pool = extractor.features(nchw(sets["fake"]), ("pool",))["pool"].float().double().numpy()
    fake_stats = FIDStats.from_features(fake_pool)
    assert got["fid"] == pytest.approx(
        frechet_distance(fake_stats.mu, fake_stats.sigma, shifted.mu, shifted.sigma)
    )
    assert got["fid"] != pytest.approx(from_images["fid"])
    for key in ("sfid", "precision", "recall", "patch_seam", "inception_score"):  # from the images
        assert got[key] == pytest.approx(from_images[key], rel=1e-9), key

    # The older FID-only statistics file still gives FID; the rest is None with the fix in the warning.
    old = tmp_path / "old.npz"
    stats = FIDStats.from_features(feats["pool"])
    np.savez(old, mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(60), extractor=np.str_(extractor.name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compute_metrics(sets["fake"], old, ALL_BUT_DINO_AND_LABELS, 4, extractor=extractor)
    assert got["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert got["inception_score"] == pytest.approx(from_images["inception_score"])
    assert all(got[k] is None for k in ("sfid", "precision", "recall", "patch_seam"))
    messages = " ".join(str(w.message) for w in caught)
    assert "recompute it with `python -m dip_lightning fid-stats`" in messages

    with pytest.raises(FileNotFoundError, match="fid-stats"):
        compute_metrics(sets["fake"], tmp_path / "missing.npz", ["fid"], extractor=extractor)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="neither images"):
        compute_metrics(sets["fake"], tmp_path / "junk.npz", ["fid"], extractor=extractor)


def test_fd_dinov2_is_the_frechet_distance_of_class_tokens(sets: dict) -> None:
    vit = DINOv2ViT(embed_dim=32, depth=1, num_heads=2, img_size=224).init_weights(
        torch.Generator().manual_seed(0)
    )
    dinov2 = DINOv2Features(model=vit)
    engine = MetricEngine.create(sets["ref"], ["fd_dinov2"], dinov2=dinov2, device="cpu", use_cache=False)
    got = engine.evaluate(engine.features([nchw(sets["fake"])]))

    # edm2's preprocessing written out: bicubic antialiased resize to 224, [0, 1], ImageNet mean/std, cls token
    def cls_tokens(images: np.ndarray) -> np.ndarray:
        x = torch.nn.functional.interpolate(
            nchw(images).float(), size=(224, 224), mode="bicubic", antialias=True
        )
        x = (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        with torch.no_grad():
            return vit.forward_features(x)["x_norm_clstoken"].float().double().numpy()

    assert got == {
        "fd_dinov2": pytest.approx(scipy_fid(cls_tokens(sets["fake"]), cls_tokens(sets["real"])), rel=1e-5)
    }
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        DINOv2Features()


def _two_process_worker(rank: int, init_file: str, ref: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        fake = smooth_images(41, seed=1, shift=0.2)  # odd: the ranks hold 20 and 21
        got = compute_metrics(
            fake, ref, ALL_BUT_DINO_AND_LABELS, 4, extractor=PixelProjection(), cache_dir=Path(out_dir) / "c"
        )
        Path(out_dir, f"rank{rank}.txt").write_text(repr(sorted(got.items())))
    finally:
        dist.destroy_process_group()


def test_two_process_extraction_equals_single_process(sets: dict, tmp_path: Path) -> None:
    expected = compute_metrics(
        smooth_images(41, seed=1, shift=0.2),
        sets["ref"],
        ALL_BUT_DINO_AND_LABELS,
        4,
        extractor=PixelProjection(),
        cache_dir=None,
    )
    run_two_forked_processes(_two_process_worker, (str(tmp_path / "init"), str(sets["ref"]), str(tmp_path)))
    for rank in range(2):
        got = dict(eval((tmp_path / f"rank{rank}.txt").read_text()))  # noqa: S307 - our own repr
        assert got == pytest.approx(expected, rel=1e-9)
    assert list((tmp_path / "c").iterdir())  # rank 0 wrote the reference cache


def test_precision_recall_distances_on_the_device_of_the_features() -> None:
    ref = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(ref, ref + 0.01, device="cpu") == pytest.approx((1.0, 1.0))


def test_a_metric_that_is_not_a_number_is_none_with_its_reason() -> None:
    """No record of the engine's results holds NaN: a non-finite value, no samples or too few samples give None
    and the reason (evaluate's ``unavailable``, sweep's result.json, the callback's empty CSV cell)."""
    from dip_lightning.core.metrics import metrics_from_features
    from dip_lightning.core.metrics.reference import Reference

    rng = np.random.default_rng(0)
    pool = rng.normal(size=(20, 8)).astype(np.float32)
    reference = Reference("ref.npz", stats={"pool": FIDStats.from_features(pool)}, pool_features=pool)
    samples = FeatureSet({"pool": pool.copy()}, num_images=20)
    samples.features["pool"][3, 2] = np.inf  # what a broken feature network could give
    unavailable: dict[str, str] = {}
    with pytest.warns(MetricUnavailableWarning, match="fid: not computed: came out nan"):
        got = metrics_from_features(samples, reference, ["fid"], unavailable=unavailable)
    assert got == {"fid": None} and "NaN or infinite" in unavailable["fid"]

    one = FeatureSet({"pool": pool[:1]}, num_images=1)
    unavailable = {}
    with pytest.warns(MetricUnavailableWarning):
        got = metrics_from_features(one, reference, ["fid", "precision", "recall"], unavailable=unavailable)
    assert got == {"fid": None, "precision": None, "recall": None}
    assert "at least 2 samples" in unavailable["fid"] and "more than 3 samples" in unavailable["recall"]
    unavailable = {}
    with pytest.warns(MetricUnavailableWarning):
        assert metrics_from_features(FeatureSet(), reference, ["fid"], unavailable=unavailable) == {
            "fid": None
        }
    assert unavailable == {"fid": "no samples"}


def test_a_reference_with_nan_statistics_is_refused_naming_the_file(tmp_path: Path) -> None:
    from dip_lightning.core.metrics.reference import BadReferenceFile, check_reference_file

    sigma = np.eye(8)
    sigma[1, 1] = np.nan
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(8), sigma=sigma, mu_s=np.zeros(4), sigma_s=np.eye(4))
    with pytest.raises(BadReferenceFile, match=f"{path}: sigma holds NaN or infinite values"):
        check_reference_file(path)
