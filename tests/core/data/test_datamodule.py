"""ShardDataModule in a real (single-process) Lightning Trainer: exact resume, bad data, config errors."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch

from dip_lightning.core.data import ShardDataModule, build_demo_dataset
from tests.helpers.data import make_recorder, write_id_shards
from tests.helpers.toy_fit import cpu_trainer

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:The `srun` command is available",
    "ignore:Be aware that when using `ckpt_path`",
    "ignore:.*isinstance.treespec, LeafSpec.",
    "ignore:Your `IterableDataset` has `__len__` defined",
)


def _trainer(max_steps: int, **kw):
    return cpu_trainer(max_steps=max_steps, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def _dm(pattern: str, **kw) -> ShardDataModule:
    args = dict(image_size=16, num_classes=4, batch_size=4, num_workers=0, shuffle_buffer=30, seed=1)
    args.update(epoch_length=4 * 3)  # 3 batches per epoch: resume points fall mid-epoch and on boundaries
    args.update(kw)
    return ShardDataModule(train_shards=pattern, **args)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    write_id_shards(folder, n_shards=3, per_shard=10)
    return str(folder / "train-{000000..000002}.tar")


def test_resume_from_checkpoint_continues_the_exact_stream(pattern, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    first = make_recorder()
    _trainer(8, callbacks=[ckpt], enable_checkpointing=True).fit(first, _dm(pattern))
    assert len(first.train_ids) == 8
    saved = torch.load(tmp_path / "step=4.ckpt", weights_only=False)
    assert saved["ShardDataModule"]["train_batches"] == 4

    for step, workers in ((4, 2), (6, 1)):  # mid-epoch and at an epoch boundary, other num_workers
        dm = _dm(pattern, num_workers=workers)
        resumed = make_recorder()
        _trainer(8).fit(resumed, dm, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        assert resumed.train_ids == first.train_ids[step:], f"resumed at step {step}"
        assert dm.start_batch == 8

    # a checkpoint written at a batch start (where the SLURM signal handling takes USR1): that batch is
    # not in the weights yet, so the resumed run must see it
    class SaveAtBatchStart(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.save_checkpoint(tmp_path / "at-start-5.ckpt")

    dm = _dm(pattern)
    _trainer(6, callbacks=[SaveAtBatchStart()]).fit(make_recorder(), dm)
    saved = torch.load(tmp_path / "at-start-5.ckpt", weights_only=False)
    assert saved["ShardDataModule"]["train_batches"] == 5 and saved["global_step"] == 5
    resumed = make_recorder()
    _trainer(8).fit(resumed, _dm(pattern, num_workers=2), ckpt_path=str(tmp_path / "at-start-5.ckpt"))
    assert resumed.train_ids == first.train_ids[5:]

    # without a datamodule state (e.g. an older checkpoint): set the position from the step
    dm = _dm(pattern, num_workers=2)
    dm.set_start_batch(5)
    manual = make_recorder()
    _trainer(3).fit(manual, dm)
    assert manual.train_ids == first.train_ids[5:8]


def test_corrupt_shard_mid_training_is_survived_and_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    write_id_shards(tmp_path / "s", n_shards=4, per_shard=10, corrupt={2: set(range(0, 10, 2))})
    dm = _dm(str(tmp_path / "s" / "train-*.tar"), max_bad_fraction=0.5, num_workers=2, shuffle_buffer=0)
    model = make_recorder()
    logger = CSVLogger(tmp_path, name="log", version=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer = _trainer(20, logger=logger, log_every_n_steps=1)
        trainer.fit(model, dm)
    assert trainer.global_step == 20 and len(model.train_ids) == 20
    assert all(len(ids) == 4 for ids in model.train_ids)
    corrupt = {20 + p for p in range(0, 10, 2)}
    assert not corrupt & {i for ids in model.train_ids for i in ids}
    metrics = dm.data_metrics()
    assert metrics["data/bad_samples"] > 0 and metrics["data/samples_read"] >= 80
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        logged = [float(r["data/bad_samples"]) for r in csv.DictReader(f) if r.get("data/bad_samples")]
    assert logged and max(logged) > 0


def test_too_much_bad_data_stops_training(tmp_path):
    write_id_shards(tmp_path, n_shards=2, per_shard=200, corrupt={0: set(range(200))})
    dm = _dm(str(tmp_path / "train-*.tar"), max_bad_fraction=0.1, epoch_length=4000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="max_bad_fraction"):
            _trainer(200).fit(make_recorder(), dm)


def test_missing_shards_and_bad_config_give_clear_errors(tmp_path):
    dm = _dm(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    assert "nothing-*.tar" in str(err.value) and str(tmp_path) in str(err.value)
    for bad in ({"batch_size": 0}, {"image_size": "256"}, {"max_bad_fraction": 2.0}, {"train_shards": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ShardDataModule(**bad)


def test_demo_dataset_is_idempotent_and_trains(tmp_path):
    import time

    info = build_demo_dataset(tmp_path / "demo", size=16, train_per_class=12, val_per_class=4)
    assert info["num_classes"] == 8 and info["num_train"] == 96 and info["num_val"] == 32
    assert info["class_names"] == (tmp_path / "demo" / "classes.txt").read_text().split()
    stamp = (tmp_path / "demo" / "train-000000.tar").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_demo_dataset(tmp_path / "demo", size=16, train_per_class=12, val_per_class=4)
    assert again == info and time.perf_counter() - t0 < 1.0
    assert (tmp_path / "demo" / "train-000000.tar").stat().st_mtime_ns == stamp

    dm = ShardDataModule(
        train_shards=info["train_shards"],
        val_shards=info["val_shards"],
        image_size=info["image_size"],
        num_classes=info["num_classes"],
        batch_size=8,
        num_workers=0,
        epoch_length=96,
    )
    model = make_recorder()
    trainer = cpu_trainer(max_steps=12)
    trainer.fit(model, dm)
    assert trainer.num_training_batches == 12
    assert sum(len(v) for v in model.val_ids) >= 32  # sanity check + one full validation pass
    assert dm.class_names == info["class_names"]
    assert {y for ys in model.train_labels for y in ys} <= set(range(8))
