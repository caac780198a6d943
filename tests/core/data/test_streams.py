"""Shard reading, the seekable training stream and the validation pass (torch only, no Lightning)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dip_lightning.core.data.preprocess import center_crop_arr, decode_image
from dip_lightning.core.data.shards import expand_shards, index_tar, shard_sample_counts
from dip_lightning.core.data.streams import (
    TrainPlan,
    TrainShardStream,
    ValShardStream,
    count_samples,
    iter_image_batches,
)
from dip_lightning.core.images import to_model_range, to_uint8
from tests.helpers.data import ids_of, write_id_shards

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def train_stream(urls, *, seed=0, rank=0, batch_size=8, epoch=6, mix=2, flip=False, max_bad=0.01, nc=4):
    return TrainShardStream(
        urls,
        shard_sample_counts(urls),
        image_size=16,
        batch_size=batch_size,
        batches_per_epoch=epoch,
        seed=seed,
        rank=rank,
        mix=mix,
        random_flip=flip,
        num_classes=nc,
        max_bad_fraction=max_bad,
    )


def collect(dataset, num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_id_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=20)


# ------------------------------------------------------------------------------------------ listing
def test_glob_without_match_names_pattern_and_folder(tmp_path):
    pattern = str(tmp_path / "train-*.tar")
    with pytest.raises(FileNotFoundError) as err:
        expand_shards(pattern)
    assert pattern in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_shards(str(tmp_path / "nope" / "train-{000000..000003}.tar"))


def test_brace_list_and_glob_expand_in_order(shards):
    folder = os.path.dirname(shards[0])
    assert expand_shards(f"{folder}/train-{{000000..000003}}.tar") == shards
    assert expand_shards(f"{folder}/train-*.tar") == shards
    assert expand_shards([shards[2], shards[0]]) == [shards[2], shards[0]]
    assert shard_sample_counts(shards) == [20] * 4
    assert count_samples(f"{folder}/train-*.tar") == 80


# ------------------------------------------------------------------------------------------ plan
def test_plan_is_a_pure_function_of_position():
    sizes = [7, 13, 0, 9]
    a, b = TrainPlan(sizes, seed=3, rank=1, mix=2), TrainPlan(sizes, seed=3, rank=1, mix=2)
    late = a.refs(500, 540)  # jump far ahead first: nothing may depend on the visiting order
    early = a.refs(0, 40)
    assert b.refs(0, 40) == early and b.refs(500, 540) == late
    assert a.refs(10, 30) == early[10:30]
    assert TrainPlan(sizes, seed=4, rank=1, mix=2).refs(0, 40) != early
    assert TrainPlan(sizes, seed=3, rank=0, mix=2).refs(0, 40) != early
    seen = a.refs(0, 2000)
    assert all(sizes[s] > ordinal >= 0 for s, ordinal in seen)
    counts = np.bincount([s for s, _ in seen], minlength=4)
    assert counts[2] == 0 and counts.min(initial=1, where=[True, True, False, True]) > 0


def test_segment_visits_every_sample_of_its_shards_once():
    plan = TrainPlan([5, 6, 7], seed=0, rank=0, mix=2)
    shards, ordinals = plan.segment(0)
    pairs = sorted(zip(shards.tolist(), ordinals.tolist()))
    chosen = plan._choices(np.asarray([0]))[0].tolist()
    expected = sorted((s, o) for s in chosen for o in range(plan.sizes[s]))
    assert pairs == expected


# ------------------------------------------------------------------------------------------ train stream
def test_stream_does_not_depend_on_num_workers(shards):
    ref = collect(train_stream(shards), 0)
    assert len(ref) == 6 and all(x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8 for x, _ in ref)
    assert all(y.dtype == torch.int64 for _, y in ref)
    for workers in (2, 3):
        got = collect(train_stream(shards), workers)
        assert [ids_of(x) for x, _ in got] == [ids_of(x) for x, _ in ref]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, ref))
    # labels match what was written
    for x, y in ref:
        assert [i % 4 for i in ids_of(x)] == y.tolist()


def test_same_seed_same_stream_other_seed_other_stream(shards):
    a = [ids_of(x) for x, _ in train_stream(shards, seed=7)]
    b = [ids_of(x) for x, _ in train_stream(shards, seed=7)]
    c = [ids_of(x) for x, _ in train_stream(shards, seed=8)]
    assert a == b and a != c


def test_cursor_resumes_exactly_with_other_worker_count(shards):
    full = [ids_of(x) for x, _ in collect(train_stream(shards, epoch=9), 0)]
    resumed = train_stream(shards, epoch=9)
    resumed.seek(4)  # e.g. restored from a checkpoint at batch 4
    got = [ids_of(x) for x, _ in collect(resumed, 2)]
    assert got[:5] == full[4:]  # a pass still yields batches_per_epoch batches from the cursor
    assert len(got) == 9


def test_random_flip_is_deterministic_and_flips(shards):
    plain = collect(train_stream(shards, flip=False), 0)
    flip1 = collect(train_stream(shards, flip=True), 0)
    flip2 = collect(train_stream(shards, flip=True), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(flip1, flip2))
    n_flipped = 0
    for (x, _), (xf, _) in zip(plain, flip1):
        for img, imgf in zip(x, xf):
            if torch.equal(img.flip(-1), imgf) and not torch.equal(img, imgf):
                n_flipped += 1
            else:
                assert torch.equal(img, imgf)
    assert 10 < n_flipped < 38  # about half of 48


def test_ranks_read_disjoint_shards_with_equal_lengths(shards):
    per_rank = [shards[r::2] for r in range(2)]
    streams = [train_stream(per_rank[r], rank=r) for r in range(2)]
    assert len(streams[0]) == len(streams[1])
    ids = [{i for x, _ in s for i in ids_of(x)} for s in streams]
    assert ids[0] and ids[1] and not ids[0] & ids[1]


# ------------------------------------------------------------------------------------------ bad data
def test_corrupt_members_and_truncated_shard_are_skipped_and_counted(tmp_path):
    urls = write_id_shards(tmp_path, n_shards=3, per_shard=20, corrupt={1: {0, 3, 5, 7}})
    # Truncate the last shard in the middle of a member: the index must stop there, not hang.
    with open(urls[2], "r+b") as f:
        f.truncate(os.path.getsize(urls[2]) // 2 + 100)
    idx = index_tar(urls[2])
    assert 0 < len(idx) < 20 and idx.error and "truncated" in idx.error
    stream = train_stream(urls, mix=1, epoch=12, max_bad=0.5)
    # Pretend a manifest promised 20 samples in the truncated shard: the missing ones become bad samples.
    stream.sizes = [20, 20, 20]
    stream.plan = TrainPlan(stream.sizes, 0, 0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = collect(stream, 0)
    assert len(batches) == 12 and all(x.shape[0] == 8 for x, _ in batches)
    read, bad = (int(v) for v in stream.counters.sum(0))
    assert read >= 96 and bad > 0
    assert any("skipping bad sample" in str(w.message) for w in caught)
    corrupt_ids = {20 + p for p in (0, 3, 5, 7)}
    assert not corrupt_ids & {i for x, _ in batches for i in ids_of(x)}


def test_too_many_bad_samples_stop_with_an_error(tmp_path):
    urls = write_id_shards(tmp_path, n_shards=2, per_shard=150, corrupt={0: set(range(0, 150, 2))})
    stream = train_stream(urls, mix=2, epoch=60, max_bad=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="max_bad_fraction"):
            collect(stream, 0)


def test_label_outside_num_classes_is_a_config_error(shards):
    with pytest.raises(ValueError, match="num_classes"):
        next(iter(train_stream(shards, nc=2)))


# ------------------------------------------------------------------------------------------ val / FID
def test_val_pass_is_disjoint_complete_and_even(tmp_path):
    urls = write_id_shards(tmp_path, n_shards=3, per_shard=11, prefix="val")  # 33 samples
    sizes = shard_sample_counts(urls)
    streams = [
        ValShardStream(urls, sizes, image_size=16, batch_size=4, rank=r, world_size=2, num_classes=4)
        for r in range(2)
    ]
    assert len(streams[0]) == len(streams[1]) == 4  # 16 samples each, one left out
    assert streams[0].dropped == 1
    got = [[i for x, _ in collect(s, w) for i in ids_of(x)] for s, w in zip(streams, (0, 3))]
    assert got[0] == list(range(0, 32, 2)) and got[1] == list(range(1, 32, 2))
    single = [i for x, _ in iter_image_batches(urls, batch_size=5) for i in ids_of(x)]
    assert single == list(range(33))


def test_iter_image_batches_crops_other_sizes_and_limits(tmp_path):
    urls = write_id_shards(tmp_path, n_shards=1, per_shard=6, size=24, prefix="val")
    batches = list(iter_image_batches(urls, batch_size=4, image_size=16, max_samples=5))
    assert [x.shape[0] for x, _ in batches] == [4, 1]
    assert batches[0][0].shape[1:] == (3, 16, 16) and batches[0][1].dtype == torch.int64


def test_remote_urls_stream_the_same_samples(shards):
    pipes = [f"pipe:cat {u}" for u in shards]
    local = [ids_of(x) for x, _ in collect(train_stream(shards), 0)]
    remote = [ids_of(x) for x, _ in collect(train_stream(pipes), 2)]
    assert remote == local
    v_local = [i for x, _ in iter_image_batches(shards, batch_size=7) for i in ids_of(x)]
    v_remote = [i for x, _ in iter_image_batches(pipes, batch_size=7, image_size=16) for i in ids_of(x)]
    assert v_remote == v_local == list(range(80))


# ------------------------------------------------------------------------------------------ preprocess
def test_center_crop_arr_follows_the_adm_steps():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    # 600x400 -> box 300x200 -> box 150x100 (100 < 128 stops) -> bicubic 96x64 -> centre crop at x=16
    ref = img.resize((300, 200), Image.Resampling.BOX).resize((150, 100), Image.Resampling.BOX)
    ref = np.asarray(ref.resize((96, 64), Image.Resampling.BICUBIC))[:, 16:80]
    assert out.shape == (64, 64, 3) and np.array_equal(out, ref)
    tiny = center_crop_arr(Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8)), 16)
    assert tiny.shape == (16, 16, 3)


def test_decode_converts_modes_to_rgb():
    import io

    for mode in ("L", "RGBA", "CMYK", "P", "I;16"):
        img = Image.new(mode, (20, 10))
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
        arr = decode_image(buf.getvalue(), 8)
        assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1, 1).permute(0, 1, 3, 2)
    f = to_model_range(x)
    assert f.dtype == torch.float32 and f.is_contiguous() and f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)
    with pytest.raises(TypeError):
        to_model_range(f)
