"""Decompression bombs: every decoded image is bounded from its header before decoding, per call (Pillow's
process-wide bound untouched); the shard tool skips and lists such inputs, the reader counts them as bad samples."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dip_lightning.core.data.prepare import prepare_split
from dip_lightning.core.data.preprocess import ImageLimits, ImageTooLarge, decode_image
from dip_lightning.core.data.shards import shard_sample_counts
from dip_lightning.core.data.streams import TooMuchBadData, TrainShardStream
from tests.helpers.data import bomb_png, id_image
from tests.helpers.memory import run_command_measured, run_measured

torch.set_num_threads(1)
PILLOW_DEFAULT_BOUND = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


def test_a_bomb_is_refused_from_its_header_without_decoding(bomb: bytes, tmp_path: Path) -> None:
    assert len(bomb) < 20_000
    with pytest.raises(ImageTooLarge, match=r"8000x8000 = 64000000 pixels .* exceeds the limit of 50000000"):
        decode_image(bomb, 32)
    # Decoded (1 byte a pixel) and converted to RGB it would pass 300 MB; refused from the header it costs nothing.
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    code = (
        "from dip_lightning.core.data.preprocess import decode_image, ImageTooLarge\n"
        f"try:\n    decode_image(open({str(path)!r}, 'rb').read(), 32)\nexcept ImageTooLarge:\n    print('refused')"
    )
    result, peak_mb = run_measured(code)
    assert result.stdout.strip() == "refused" and peak_mb < 150, (result.stdout, peak_mb)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_BOUND  # importing the kit leaves Pillow's global alone


def test_limits_are_arguments_and_the_defaults_pass_imagenet() -> None:
    image = id_image(0, 20, 0)  # a 20 x 20 RGB PNG
    assert decode_image(image).shape == (20, 20, 3)
    with pytest.raises(ImageTooLarge, match="20x20 = 400 pixels"):
        decode_image(image, limits=ImageLimits(max_pixels=399))
    with pytest.raises(ImageTooLarge, match="bytes, above the limit"):
        decode_image(image, limits=ImageLimits(max_bytes=len(image) - 1))
    # The largest ImageNet train images (~32 M pixels), also as 4-byte CMYK, pass the defaults.
    ImageLimits().check_decoded(7056, 4488, 4)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 1"):
        ImageLimits(max_pixels=0)


def _shard_with(path: Path, images: list[bytes]) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as writer:
        for i, data in enumerate(images):
            writer.write({"__key__": f"s{i:04d}", "png": data, "cls": b"0"})
    return str(path)


def _stream(urls: list[str], **kw) -> TrainShardStream:
    args = dict(image_size=16, batch_size=8, batches_per_epoch=2, num_classes=4, mix=1, max_bad_fraction=0.5)
    return TrainShardStream(urls, shard_sample_counts(urls), **(args | kw))


def test_the_reader_counts_a_bomb_as_a_bad_sample(bomb: bytes, tmp_path: Path) -> None:
    url = _shard_with(tmp_path / "train-000000.tar", [bomb] + [id_image(i, 16, 0) for i in range(1, 8)])
    stream = _stream([url])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _ = stream.make_batch(0)
    assert images.shape == (8, 3, 16, 16)
    assert stream.counters.sum(0).tolist() == [8, 1]
    (message,) = [str(w.message) for w in caught if "skipping bad sample" in str(w.message)]
    assert "s0000" in message and "ImageTooLarge" in message and "8000x8000" in message


def test_the_data_module_passes_its_limits_to_the_reader(tmp_path: Path) -> None:
    from dip_lightning.core.data import ShardDataModule

    images = [id_image(i, 16, 0) for i in range(300)]
    _shard_with(tmp_path / "train-000000.tar", images)
    dm = ShardDataModule(
        train_shards=str(tmp_path / "train-000000.tar"),
        image_size=16,
        num_classes=4,
        batch_size=50,
        num_workers=0,
        epoch_length=300,
        max_image_pixels=255,  # every 16 x 16 image is "too large"
    )
    stream = dm.train_stream(0, 1)
    assert stream.limits == ImageLimits(max_pixels=255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooMuchBadData, match="max_bad_fraction"):
            list(stream)


def test_prepare_skips_and_lists_a_bomb(bomb: bytes, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "bomb.png").write_bytes(bomb)
    for i in range(3):
        Image.fromarray(np.full((24, 24, 3), 60 * i, np.uint8)).save(src / "a" / f"ok{i}.png")
    manifest = prepare_split(src, tmp_path / "out", image_size=16, workers=1, progress=False)
    assert manifest["num_samples"] == 3 and manifest["limits"] == {
        "max_pixels": 50_000_000,
        "max_bytes": 2**28,
    }
    (bad,) = manifest["bad_files"]
    assert bad["path"] == "a/bomb.png" and bad["error"].startswith("ImageTooLarge: PNG 1 image of 8000x8000")
    # A lower limit is an option, and part of the shards' configuration.
    lower = prepare_split(src, tmp_path / "low", image_size=16, workers=1, progress=False, max_pixels=500)
    assert lower["num_samples"] == 0 and lower["num_bad"] == 4


@pytest.mark.slow
def test_prepare_command_skips_a_bomb_at_small_cost(bomb: bytes, tmp_path: Path) -> None:
    """The issue's case through the command: a bomb PNG in a class folder; peak memory of the real process."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "bomb.png").write_bytes(bomb)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "ok.png")
    args = [
        "--src",
        str(src.parent),
        "--out",
        str(tmp_path / "out"),
        "--size",
        "16",
        "--workers",
        "1",
        "--quiet",
    ]
    result, peak_mb = run_command_measured("prepare", *args, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 samples in 1 shards, 1 classes, 1 skipped" in result.stdout
    assert "skipped a/bomb.png: ImageTooLarge" in result.stdout
    assert peak_mb < 200, f"prepare peaked at {peak_mb:.0f} MB"
    manifest = json.loads((tmp_path / "out" / "train-manifest.json").read_text())
    assert [b["path"] for b in manifest["bad_files"]] == ["a/bomb.png"]
