"""Class agreement: the formula against a brute-force nearest neighbour, labels through every path that carries them
(image npz ``arr_1``, shards, the kit's reference file, two processes), and a clear None or error where they lack.

Features come from `PixelProjection` (see test_engine.py); classes differ in brightness, which it sees.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dip_lightning.core.metrics import MetricEngine, MetricUnavailableWarning, compute_metrics
from dip_lightning.core.metrics.class_agreement import class_agreement
from dip_lightning.core.metrics.features import PixelProjection
from dip_lightning.core.metrics.reference import (
    BadReferenceFile,
    extract_feature_set,
    load_reference,
    save_reference,
)
from dip_lightning.core.metrics.sources import BadImageArray, iter_shard_images
from tests.helpers.metrics import CLASSES, labelled_images, nchw, run_two_forked_processes

torch.set_num_threads(1)


def brute_force_agreement(
    ref: np.ndarray, ref_labels: np.ndarray, fake: np.ndarray, labels: np.ndarray
) -> float:
    hits = [ref_labels[np.argmin(((ref - f) ** 2).sum(-1))] == y for f, y in zip(fake, labels, strict=True)]
    return float(np.mean(hits))


@pytest.fixture()
def labelled(tmp_path: Path) -> dict:
    real, real_labels = labelled_images(15, seed=0)
    fake, fake_labels = labelled_images(10, seed=1)
    np.savez(tmp_path / "real.npz", arr_0=real, arr_1=real_labels)
    return {
        "real": real,
        "real_labels": real_labels,
        "fake": fake,
        "labels": fake_labels,
        "ref": tmp_path / "real.npz",
    }


def test_class_agreement_equals_a_brute_force_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    ref, fake = rng.normal(size=(50, 6)), rng.normal(size=(30, 6))
    ref_labels, labels = rng.integers(0, 3, 50), rng.integers(0, 3, 30)
    expected = brute_force_agreement(ref, ref_labels, fake, labels)
    assert class_agreement(ref, ref_labels, fake, labels, block_size=7) == pytest.approx(expected)
    assert 0 < expected < 1
    # The reference scored against itself: every point is its own nearest neighbour.
    assert class_agreement(ref, ref_labels, ref, ref_labels) == 1.0


def test_compute_metrics_scores_labelled_samples_against_an_image_npz_with_labels(labelled: dict) -> None:
    extractor = PixelProjection()
    features = {
        name: extractor.features(nchw(labelled[name]), ("pool",))["pool"].numpy() for name in ("real", "fake")
    }
    expected = brute_force_agreement(
        features["real"], labelled["real_labels"], features["fake"], labelled["labels"]
    )
    got = compute_metrics(
        labelled["fake"], labelled["ref"], ["class_agreement"], extractor=extractor, labels=labelled["labels"]
    )
    assert got["class_agreement"] == pytest.approx(expected)
    assert expected > 0.9  # the classes are apart in these features
    wrong = compute_metrics(
        labelled["fake"],
        labelled["ref"],
        ["class_agreement"],
        extractor=extractor,
        labels=(labelled["labels"] + 1) % CLASSES,
    )
    assert wrong["class_agreement"] < 0.1


def test_class_agreement_is_none_with_its_reason_without_labels(labelled: dict, tmp_path: Path) -> None:
    extractor = PixelProjection()
    unavailable: dict[str, str] = {}
    with pytest.warns(MetricUnavailableWarning, match="class_agreement: not computed: the samples carry no"):
        got = compute_metrics(
            labelled["fake"],
            labelled["ref"],
            ["class_agreement"],
            extractor=extractor,
            unavailable=unavailable,
        )
    assert got == {"class_agreement": None} and "arr_1" in unavailable["class_agreement"]
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, arr_0=labelled["real"])
    unavailable = {}
    with pytest.warns(MetricUnavailableWarning, match="holds no class labels"):
        got = compute_metrics(
            labelled["fake"],
            unlabelled,
            ["class_agreement", "fid"],
            extractor=extractor,
            labels=labelled["labels"],
            unavailable=unavailable,
        )
    assert got["class_agreement"] is None and got["fid"] is not None
    assert "fid-stats" in unavailable["class_agreement"]
    with pytest.raises(ValueError, match="40 samples need 40 labels"):
        compute_metrics(
            labelled["fake"], labelled["ref"], ["class_agreement"], extractor=extractor, labels=[0, 1]
        )


def test_labels_that_do_not_fit_the_images_are_refused_naming_the_file(
    labelled: dict, tmp_path: Path
) -> None:
    short = tmp_path / "short.npz"
    np.savez(short, arr_0=labelled["real"], arr_1=labelled["real_labels"][:-1])
    with pytest.raises(
        BadImageArray, match=rf"{short}:arr_1 should hold one integer class label per image \(60\)"
    ):
        compute_metrics(
            labelled["fake"],
            short,
            ["class_agreement"],
            extractor=PixelProjection(),
            labels=labelled["labels"],
        )
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=labelled["real"], arr_1=labelled["real_labels"].astype(np.float32))
    with pytest.raises(BadImageArray, match="one integer class label"):
        compute_metrics(
            labelled["fake"],
            floats,
            ["class_agreement"],
            extractor=PixelProjection(),
            labels=labelled["labels"],
        )


def test_the_reference_file_keeps_the_labels_of_its_pool_features(labelled: dict, tmp_path: Path) -> None:
    extractor = PixelProjection()
    batches = (
        (nchw(labelled["real"][i : i + 16]), labelled["real_labels"][i : i + 16]) for i in range(0, 60, 16)
    )
    features = extract_feature_set(batches, {"pool"}, extractor, torch.device("cpu"))
    path = tmp_path / "ref_stats.npz"
    save_reference(path, features, pr_size=50)  # fewer features kept than images: labels cut alike
    ref = load_reference(path, ["class_agreement"], extractor, torch.device("cpu"))
    assert ref.pool_labels is not None and np.array_equal(ref.pool_labels, labelled["real_labels"][:50])
    assert np.array_equal(ref.pool_features, features.features["pool"][:50])
    engine = MetricEngine.create(path, ["class_agreement"], extractor=extractor, device="cpu")
    direct = compute_metrics(
        labelled["fake"], labelled["ref"], ["class_agreement"], extractor=extractor, labels=labelled["labels"]
    )
    from_file = engine.features(((nchw(labelled["fake"]), labelled["labels"]),))
    got = engine.evaluate(from_file)["class_agreement"]
    assert got is not None and abs(got - direct["class_agreement"]) <= 0.1  # 50 of the 60 references

    bad = tmp_path / "bad_labels.npz"
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(bad, **{**arrays, "pool_labels": arrays["pool_labels"][:10]})
    with pytest.raises(
        BadReferenceFile, match=rf"{bad}: pool_labels .* not one integer label per each of its 50"
    ):
        load_reference(bad, ["class_agreement"], extractor, torch.device("cpu"))


def test_shards_give_their_labels(demo_data: dict) -> None:
    """`iter_shard_images(labelled=True)` pairs each image with the shard's ``cls``, on each rank's share too."""
    pairs = list(iter_shard_images(demo_data["val_shards"], 16, demo_data["image_size"], labelled=True))
    labels = np.concatenate([y for _, y in pairs])
    images = torch.cat([x for x, _ in pairs])
    assert len(labels) == len(images) == demo_data["num_val"]
    assert sorted(set(labels.tolist())) == list(range(demo_data["num_classes"]))
    plain = torch.cat(list(iter_shard_images(demo_data["val_shards"], 16, demo_data["image_size"])))
    assert torch.equal(images, plain)
    shares = [
        np.concatenate(
            [
                y
                for _, y in iter_shard_images(
                    demo_data["val_shards"], 5, 32, rank=r, world_size=2, labelled=True
                )
            ]
        )
        for r in range(2)
    ]
    assert np.array_equal(np.sort(np.concatenate(shares)), np.sort(labels))


def _two_process_worker(rank: int, init_file: str, ref: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        fake, labels = labelled_images(10, seed=1)
        fake, labels = fake[:-1], labels[:-1]  # odd: the ranks hold 19 and 20
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricUnavailableWarning)
            got = compute_metrics(fake, ref, ["class_agreement"], extractor=PixelProjection(), labels=labels)
        Path(out_dir, f"rank{rank}.txt").write_text(repr(got["class_agreement"]))
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_the_labels_with_the_features(labelled: dict, tmp_path: Path) -> None:
    # Sorted by class: labels out of step with the features would show.
    fake, labels = labelled_images(10, seed=1)
    expected = compute_metrics(
        fake[:-1], labelled["ref"], ["class_agreement"], extractor=PixelProjection(), labels=labels[:-1]
    )
    run_two_forked_processes(
        _two_process_worker, (str(tmp_path / "init"), str(labelled["ref"]), str(tmp_path))
    )
    for rank in range(2):
        assert float((tmp_path / f"rank{rank}.txt").read_text()) == pytest.approx(expected["class_agreement"])
