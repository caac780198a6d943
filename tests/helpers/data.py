"""Helpers shared by the data tests: shards whose images carry their sample id in the pixels.

Sample ``i`` is a small PNG whose red/green channels at (0, 0) store ``i`` (lossless), with label
``i % num_classes``; shards are written with ``webdataset.TarWriter`` (a standard writer, no manifest),
so the DataModule is tested on "other tools'" shards as well as on the prepare tool's output.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def id_image(i: int, size: int, label: int) -> bytes:
    arr = np.full((size, size, 3), 40 * label + 20, dtype=np.uint8)
    arr[..., 2] = (np.arange(size)[None, :] * 7 + i) % 256  # some texture so flips are visible
    arr[0, 0, 0], arr[0, 0, 1] = i % 256, i // 256
    arr[0, -1, 0], arr[0, -1, 1] = i % 256, i // 256  # mirror position: the id survives a flip
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_id_shards(
    folder: Path,
    n_shards: int,
    per_shard: int,
    *,
    size: int = 16,
    num_classes: int = 4,
    prefix: str = "train",
    start_id: int = 0,
    corrupt: dict[int, set[int]] | None = None,
) -> list[str]:
    """Write ``n_shards`` tars; ``corrupt[shard] = {positions}`` get undecodable image bytes."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    i = start_id
    for k in range(n_shards):
        path = folder / f"{prefix}-{k:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for pos in range(per_shard):
                label = i % num_classes
                data = id_image(i, size, label)
                if corrupt and pos in corrupt.get(k, set()):
                    data = b"\x89PNG\r\n\x1a\n" + os.urandom(64)
                writer.write({"__key__": f"s{i:06d}", "png": data, "cls": str(label).encode()})
                i += 1
        paths.append(str(path))
    return paths


def ids_of(images) -> list[int]:
    """Sample ids of a uint8 (B, 3, H, W) batch (flip-proof: reads both top corners)."""
    x = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    left = x[:, 0, 0, 0].astype(int) + 256 * x[:, 1, 0, 0].astype(int)
    return left.tolist()


def ids_of_float(x) -> list[int]:
    """Same for float batches in [-1, 1] (after on_after_batch_transfer)."""
    u = ((x.detach().cpu().float() + 1) * 127.5).round().to(dtype=__import__("torch").uint8)
    return ids_of(u)


def make_recorder(check_range: bool = True):
    """A LightningModule with one parameter that records every batch it sees, and its sample ids."""
    import lightning.pytorch as pl
    import torch

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_batches: list[torch.Tensor] = []
            self.train_ids: list[list[int]] = []
            self.train_labels: list[list[int]] = []
            self.val_ids: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            if check_range:  # the DataModule's on_after_batch_transfer made float [-1, 1]
                assert x.dtype == torch.float32 and x.is_contiguous() and -1 <= x.min() <= x.max() <= 1
                assert y.dtype == torch.int64
            self.train_batches.append(x.detach().clone())
            self.train_ids.append(ids_of_float(x))
            self.train_labels.append(y.tolist())
            return (self.w * x.mean()).sum()

        def validation_step(self, batch, batch_idx):
            self.val_ids.append(ids_of_float(batch[0]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Recorder()


def write_wide_shards(
    folder: Path, n_shards: int, per_shard: int, *, width: int = 28, height: int = 16
) -> list[str]:
    """Shards of ``width x height`` images (not square, as ``prepare --preprocess none`` keeps them): every column
    has its own value in the blue channel (column index * 9), so a crop's offset can be read from its pixels; the
    red channel holds the sample id modulo 256, label ``i % 4``."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    i = 0
    for k in range(n_shards):
        path = folder / f"wide-{k:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for _ in range(per_shard):
                arr = np.zeros((height, width, 3), dtype=np.uint8)
                arr[..., 0] = i % 256
                arr[..., 1] = 40 * (i % 4)
                arr[..., 2] = (np.arange(width) * 9)[None, :]
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                writer.write({"__key__": f"w{i:06d}", "png": buf.getvalue(), "cls": str(i % 4).encode()})
                i += 1
        paths.append(str(path))
    return paths


def bomb_png(side: int = 8000) -> bytes:
    """A real decompression bomb: a 1-bit, all-black ``side x side`` PNG made by Pillow. 8000 x 8000 (64 M pixels,
    above the default limit) is 8 KB on disk and ~0.3 s to make; decoded to RGB it would take ~250 MB."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()
