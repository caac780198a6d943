"""`make demo`, shortened: the same ``run_demo`` (dataset, metrics reference, CLI fit with EMA, grids and the
metrics suite) for 20 steps of the tests' tiny config (32 px, so the fixture's crops are reused), the metrics
callback's extractor switched to the cheap pixel projection by the extra CLI args."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.commands.demo import reference_stats, run_demo
from dip_lightning.core.data.demo_dataset import DEFAULT_CROP_SCALE
from dip_lightning.core.metrics.features import PixelProjection
from tests.helpers.tiny import TINY_CONFIG

pytestmark = pytest.mark.slow  # the whole demo, end to end

CALLBACKS = [
    {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.9}},
    {
        "class_path": "dip_lightning.training.callbacks.SampleGrid",
        "init_args": {"every_n_steps": 10, "rows": 2, "cols": 4, "num_steps": 5, "upscale": 2},
    },
    {
        "class_path": "dip_lightning.training.callbacks.MetricsCallback",
        "init_args": {
            "every_n_steps": 10,
            "num_samples": 16,
            "batch_size": 16,
            "num_steps": 5,
            "reference": "data/demo/ref_val.npz",  # replaced by run_demo
            "metrics": ["fid", "sfid", "precision", "recall", "patch_seam", "class_agreement"],
            "extractor": {"class_path": "dip_lightning.core.metrics.features.PixelProjection"},
        },
    },
]


def test_demo_end_to_end_shortened(tmp_path: Path, demo_data: dict) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(demo_data["root"], data_dir)  # run_demo writes its FID reference next to the data
    result = run_demo(
        data_dir=data_dir,
        run_root=tmp_path / "runs",
        config=TINY_CONFIG,
        crop_scale=DEFAULT_CROP_SCALE,  # the fixture's crops
        extra_args=[
            "--trainer.max_steps=20",
            "--trainer.val_check_interval=10",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--checkpoint.every_n_train_steps=10",
            "--data.init_args.batch_size=16",
            f"--trainer.callbacks={json.dumps(CALLBACKS)}",
        ],
    )
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == tmp_path / "runs"
    assert 0 < result["fit_time_s"] <= result["wall_time_s"]

    # The grid of the last step, and the one before.
    grid = Path(result["grid"])
    assert grid.name == "step_00000020.png" and grid.is_file()
    assert sorted(p.name for p in grid.parent.glob("*.png")) == ["step_00000010.png", "step_00000020.png"]
    assert json.loads(grid.with_suffix(".json").read_text())["row_classes"] == [0, 4]

    # TensorBoard event files with the grid images and the FID curve.
    tensorboard = Path(result["tensorboard"])
    assert list(tensorboard.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/grid")] == [10, 20]
    for metric in ("fid", "sfid", "precision", "recall", "patch_seam", "class_agreement"):
        assert [e.step for e in events.Scalars(f"val/{metric}")] == [10, 20], metric
    assert "train/loss" in events.Tags()["scalars"] and "val/loss" in events.Tags()["scalars"]

    # The checkpoint, with EMA and raw weights.
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 20 and "current_model_state" in ckpt
    assert int(ckpt["averaging_state"]["n_averaged"]) == 20

    # Two evaluations, at steps 10 and 20, against the pixel projection's reference file made by the demo.
    history = result["fid_history"]
    assert [step for step, _ in history] == [10, 20]
    assert all(np.isfinite(value) and value > 0 for _, value in history)
    with open(tensorboard / "eval_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert all(0 <= float(r["precision"]) <= 1 and float(r["patch_seam"]) > 0 for r in rows)
    assert all(0 <= float(r["class_agreement"]) <= 1 for r in rows)
    reference = data_dir / "ref_val-pixel-projection-64x8-seed0.npz"
    with np.load(reference) as npz:
        assert int(npz["num_samples"]) == demo_data["num_val"] and "pool_features" in npz.files
        assert np.bincount(npz["pool_labels"]).tolist() == [demo_data["num_val"] // 8] * 8
    assert not (data_dir / "ref_val.npz").exists()  # the Inception reference was not needed


class _WritesReferenceMeanwhile(PixelProjection):
    """An extractor during whose first batch a concurrent demo finishes the same reference file."""

    def __init__(self, shards: str, out: Path) -> None:
        super().__init__()
        self.shards, self.out, self.written = shards, out, False

    def features(self, images: torch.Tensor, kinds=("pool",)) -> dict:
        if not self.written:
            self.written = True
            reference_stats(self.shards, self.out, 32, PixelProjection())
        return super().features(images, kinds)


def test_concurrent_demos_share_the_reference_file(tmp_path: Path, demo_data: dict) -> None:
    # Two demos started together on one fresh data folder: the one that finishes second used to stop with
    # "ref_val.npz exists; pass overwrite" after computing the same statistics.
    out = tmp_path / "ref_val.npz"
    extractor = _WritesReferenceMeanwhile(demo_data["val_shards"], out)
    assert reference_stats(demo_data["val_shards"], out, 32, extractor) == out
    assert extractor.written and out.exists()
    with np.load(out) as ref:
        assert ref["pool_features"].shape[0] == demo_data["num_val"]


def test_a_reference_without_labels_or_damaged_is_made_again(tmp_path: Path, demo_data: dict) -> None:
    """A data folder's reference from before class agreement (no labels), or a damaged one, is rebuilt: the demo
    owns it, and reusing it would leave class agreement unavailable (or the run failing) on every demo."""
    from dip_lightning.core.metrics.reference import extract_feature_set, save_reference
    from dip_lightning.core.metrics.sources import iter_shard_images

    out = tmp_path / "ref_val.npz"
    unlabelled = extract_feature_set(
        iter_shard_images(demo_data["val_shards"], 64, 32), {"pool"}, PixelProjection(), torch.device("cpu")
    )
    assert unlabelled.labels is None
    save_reference(out, unlabelled)
    assert reference_stats(demo_data["val_shards"], out, 32, PixelProjection()) == out
    with np.load(out) as ref:
        assert len(ref["pool_labels"]) == demo_data["num_val"] and "seam_cols" in ref.files
    out.write_bytes(b"not an npz")
    reference_stats(demo_data["val_shards"], out, 32, PixelProjection())
    with np.load(out) as ref:
        assert len(ref["pool_labels"]) == demo_data["num_val"]
    before = out.stat().st_mtime_ns
    reference_stats(demo_data["val_shards"], out, 32, PixelProjection())
    assert out.stat().st_mtime_ns == before  # a labelled one is reused
