"""ShardDataModule under a real two-process DDP run: ``Trainer(strategy="ddp", devices=2)`` on CPU/gloo.

This file is also the training script: Lightning's DDP launcher re-runs ``sys.argv`` for rank 1, so the
test starts ``python tests/core/data/test_datamodule_ddp.py SHARDS OUT`` in a subprocess and reads what each rank wrote.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers.commands import run_process
from tests.helpers.data import make_recorder, write_id_shards
from tests.helpers.tiny import subprocess_env
from tests.helpers.toy_fit import cpu_trainer

pytestmark = pytest.mark.slow  # a two-process DDP run

BATCH, STEPS, WORKERS, SEED = 4, 7, 2, 5


def _datamodule(shard_dir: str, num_workers: int):
    from dip_lightning.core.data import ShardDataModule

    return ShardDataModule(
        train_shards=f"{shard_dir}/train-{{000000..000003}}.tar",
        val_shards=f"{shard_dir}/val-*.tar",
        image_size=16,
        num_classes=4,
        batch_size=BATCH,
        val_batch_size=3,
        num_workers=num_workers,
        shuffle_buffer=30,
        seed=SEED,
        epoch_length=BATCH * 2 * 3,  # 3 batches per rank per epoch: STEPS crosses two epoch boundaries
    )


def ddp_main(shard_dir: str, out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    dm = _datamodule(shard_dir, WORKERS)
    model = make_recorder()
    trainer = cpu_trainer(devices=2, strategy="ddp", max_steps=STEPS, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(
            {
                "train": model.train_ids,
                "labels": model.train_labels,
                "val": model.val_ids,
                "start_batch": dm.start_batch,
                "world_size": trainer.world_size,
                "metrics": dm.data_metrics(),
            },
            f,
        )


def test_ddp_ranks_get_different_samples_and_equal_batch_counts(tmp_path):
    shard_dir = tmp_path / "shards"
    write_id_shards(shard_dir, n_shards=4, per_shard=12)
    write_id_shards(shard_dir, n_shards=2, per_shard=9, prefix="val", start_id=1000)  # 18 val samples
    out = tmp_path / "out"
    out.mkdir()
    script = [sys.executable, str(Path(__file__).resolve()), str(shard_dir), str(out)]
    res = run_process(script, cwd=tmp_path, env=subprocess_env(threads=1), timeout=180)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)

    # equal batch counts, full batches, exact position bookkeeping
    assert [len(r["train"]) for r in ranks] == [STEPS, STEPS]
    assert all(len(b) == BATCH for r in ranks for b in r["train"])
    assert [r["start_batch"] for r in ranks] == [STEPS, STEPS]
    # different samples: shards are split by node (rank 0: shards 0, 2; rank 1: shards 1, 3)
    seen = [{i for b in r["train"] for i in b} for r in ranks]
    assert not seen[0] & seen[1]
    assert {i // 12 for i in seen[0]} == {0, 2} and {i // 12 for i in seen[1]} == {1, 3}
    for r in ranks:
        assert [[i % 4 for i in b] for b in r["train"]] == r["labels"]

    # each rank's stream is the pure function of (seed, rank, world_size, batch index): computing it here
    # in one process without workers gives the same batches, across the two epoch boundaries
    from tests.helpers.data import ids_of

    dm = _datamodule(str(shard_dir), 0)
    for rank in range(2):
        stream = dm.train_stream(rank=rank, world_size=2)
        expected = [ids_of(stream.make_batch(b)[0]) for b in range(STEPS)]
        assert ranks[rank]["train"] == expected, f"rank {rank}"

    # validation: 2 epochs x 3 batches (9 samples per rank, batch 3), disjoint, complete, deterministic
    for r, rank in enumerate(ranks):
        assert len(rank["val"]) == 6 and rank["val"][:3] == rank["val"][3:]
        assert [i for b in rank["val"][:3] for i in b] == list(range(1000 + r, 1018, 2))
    assert ranks[0]["metrics"]["data/bad_samples"] == 0


if __name__ == "__main__":
    ddp_main(sys.argv[1], sys.argv[2])
