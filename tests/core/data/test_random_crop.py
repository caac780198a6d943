"""The released ``random_crop`` augmentation (resize, random crop, horizontal flip): off by default and then
bit-identical to the centre-crop path, deterministic per (seed, sample position), exactly resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dip_lightning.core.data import ShardDataModule
from dip_lightning.core.data.preprocess import center_crop_arr, decode_image, random_crop_arr
from dip_lightning.core.data.shards import shard_sample_counts
from dip_lightning.core.data.streams import TrainShardStream
from tests.helpers.data import make_recorder, write_wide_shards
from tests.helpers.toy_fit import cpu_trainer

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings(
    "ignore:This DataLoader will create:UserWarning",
    "ignore:.*does not have many workers.*",
    "ignore:.*isinstance.treespec, LeafSpec.",
    "ignore:Be aware that when using `ckpt_path`",
)
SIZE = 16


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> list[str]:
    return write_wide_shards(tmp_path_factory.mktemp("wide"), n_shards=3, per_shard=12)


def stream(urls, *, crop: bool, seed: int = 0, flip: bool = False) -> TrainShardStream:
    return TrainShardStream(
        urls,
        shard_sample_counts(urls),
        image_size=SIZE,
        batch_size=6,
        batches_per_epoch=6,
        seed=seed,
        mix=2,
        random_flip=flip,
        random_crop=crop,
        num_classes=4,
    )


def batches(dataset, num_workers: int = 0) -> list[torch.Tensor]:
    return [x.clone() for x, _ in DataLoader(dataset, batch_size=None, num_workers=num_workers)]


def column_offset(image: torch.Tensor) -> tuple[int, bool]:
    """(first source column, flipped) of a crop of a wide test image (blue = column * 9)."""
    blue = image[2, 0].tolist()
    flipped = blue[0] > blue[-1]
    first = min(blue[0], blue[-1]) // 9
    return first, flipped


def test_random_crop_arr_is_resize_then_a_window_along_the_longer_side() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (32, 56, 3), dtype=np.uint8)  # h 32, w 56
    img = Image.fromarray(arr)
    resized = np.asarray(img.resize((28, 16), resample=Image.Resampling.BILINEAR))  # short side -> 16
    for offset, start in ((0.0, 0), (0.5, 6), (0.999, 12)):  # 13 possible windows
        assert np.array_equal(random_crop_arr(img, SIZE, offset), resized[:, start : start + SIZE])
    tall = Image.fromarray(arr.transpose(1, 0, 2).copy())  # h 56, w 32
    got = random_crop_arr(tall, SIZE, 0.5)
    assert got.shape == (SIZE, SIZE, 3)
    square = Image.fromarray(arr[:16, :16])
    assert np.array_equal(random_crop_arr(square, SIZE, 0.7), arr[:16, :16])  # already the size: unchanged
    with pytest.raises(ValueError, match="offset"):
        random_crop_arr(img, SIZE, 1.0)


def test_off_is_the_centre_crop_path_bit_for_bit(wide) -> None:
    plain = batches(stream(wide, crop=False))
    default = TrainShardStream(
        wide,
        shard_sample_counts(wide),
        image_size=SIZE,
        batch_size=6,
        batches_per_epoch=6,
        mix=2,
        num_classes=4,
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, batches(default), strict=True))
    # ... and that is the ADM centre crop of every source image.
    import webdataset as wds

    sources = {}
    for url in wide:
        for sample in wds.WebDataset(url, shardshuffle=False):
            arr = decode_image(sample["png"])
            sources[int(arr[0, 0, 0])] = center_crop_arr(Image.fromarray(arr), SIZE)
    for x in plain:
        for image in x:
            want = sources[int(image[0, 0, 0])]
            assert np.array_equal(image.permute(1, 2, 0).numpy(), want)
    assert ShardDataModule(train_shards=wide[0], image_size=SIZE).random_crop is False


def test_crops_are_random_deterministic_and_independent_of_workers(wide) -> None:
    first = batches(stream(wide, crop=True))
    again = batches(stream(wide, crop=True), num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    offsets = [column_offset(img) for x in first for img in x]
    assert len({o for o, _ in offsets}) >= 5  # 13 possible windows
    assert 8 < sum(f for _, f in offsets) < 28  # the flip of about half of 36
    other = [column_offset(img) for x in batches(stream(wide, crop=True, seed=1)) for img in x]
    assert other != offsets


def test_resume_sees_the_same_crops(wide, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def datamodule(**kw) -> ShardDataModule:  # noqa: ANN003
        args = {"image_size": SIZE, "num_classes": 4, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 12}
        return ShardDataModule(train_shards=wide, epoch_length=12, random_crop=True, **{**args, **kw})

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = make_recorder()
    cpu_trainer(max_steps=7, limit_val_batches=0, callbacks=[ckpt], enable_checkpointing=True).fit(
        full, datamodule()
    )
    resumed = make_recorder()
    cpu_trainer(max_steps=7, limit_val_batches=0).fit(
        resumed, datamodule(num_workers=2), ckpt_path=tmp_path / "step=3.ckpt"
    )
    assert len(resumed.train_batches) == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed.train_batches, full.train_batches[3:], strict=True))
    assert torch.load(tmp_path / "step=3.ckpt", weights_only=False)["ShardDataModule"]["random_crop"] is True
