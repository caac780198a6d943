"""Image sources of the metrics engine: uint8 batches streamed from an npz (ADM layout) or WebDataset shards.

An npz's image array is checked from its header before any image is read (:func:`npz_images`): dtype, layout,
the per-image :class:`~dip_lightning.core.data.preprocess.ImageLimits`, that the zip member holds exactly the bytes
the header declares, and the reference's image size where there is one. A 3 MB npz can declare gigabytes of
zeros; decoding first and comparing afterwards would cost that memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dip_lightning.core.data.preprocess import DEFAULT_LIMITS, ImageLimits
from dip_lightning.core.metrics.errors import MetricsError

__all__ = [
    "BadImageArray",
    "NpzImages",
    "iter_npz_images",
    "iter_shard_images",
    "npz_image_count",
    "npz_array_sizes",
    "npz_image_shape",
    "npz_images",
    "npz_labels",
]


class BadImageArray(MetricsError):
    """An npz whose image array is not what it must be (no readable npz, no ``arr_0``, layout, size, declared
    bytes, no images); nothing was read."""


#: What zipfile, zlib and numpy raise for a file that is no (complete) npz.
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)


@contextlib.contextmanager
def _open_npz(path: str | os.PathLike[str]) -> Iterator[zipfile.ZipFile]:
    """The npz as a zip; a file that is no zip, or whose members or headers cannot be read (cut short, a bad
    CRC), is a :class:`BadImageArray` naming it."""
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except _DAMAGED as err:
        if isinstance(err, MetricsError):
            raise
        raise BadImageArray(
            f"{path}: not a readable npz ({type(err).__name__}: {err}); it is damaged, incomplete or no npz at "
            "all: write it again (`sample` writes the ADM layout)"
        ) from err


@dataclass(frozen=True)
class NpzImages:
    """The header of an npz's image array, checked (:func:`npz_images`)."""

    shape: tuple[int, ...]
    nhwc: bool  # (N, H, W, 3), the ADM layout; else (N, 3, H, W)

    @property
    def count(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of every image."""
        return (self.shape[1], self.shape[2]) if self.nhwc else (self.shape[2], self.shape[3])


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open ``.npy`` stream, leaving it positioned at the data."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_member(zf: zipfile.ZipFile, key: str) -> str:
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise BadImageArray(
            f"{zf.filename}: no {key!r} array (members: {zf.namelist()}); an image npz holds uint8 images "
            "(N, H, W, 3) under arr_0, as `sample` writes them"
        )
    return name


def _member_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, bytes of data the member holds)`` of one ``.npy`` member, data unread."""
    with zf.open(name) as f:
        shape, fortran, dtype = _read_npy_header(f)
        return tuple(int(s) for s in shape), fortran, dtype, zf.getinfo(name).file_size - f.tell()


def npz_array_sizes(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``{key: (bytes its header declares, bytes its member holds)}`` of every array of an npz, from the headers
    only (object arrays, which np.load refuses anyway, count 0 declared bytes)."""
    sizes = {}
    with _open_npz(path) as zf:
        for name in zf.namelist():
            shape, _, dtype, stored = _member_header(zf, name)
            declared = 0 if dtype.hasobject else math.prod(shape) * dtype.itemsize
            sizes[name.removesuffix(".npy")] = (declared, stored)
    return sizes


def _checked_header(
    path: str | os.PathLike[str],
    key: str,
    shape: tuple[int, ...],
    fortran: bool,
    dtype: np.dtype,
    data_bytes: int,
) -> NpzImages:
    where = f"{path}:{key}"
    if dtype != np.uint8 or len(shape) != 4 or fortran:
        raise BadImageArray(f"{where} must be a C-order uint8 (N, H, W, 3) array, got {dtype} {shape}")
    nhwc = shape[-1] == 3
    if not nhwc and shape[1] != 3:
        raise BadImageArray(f"{where} has shape {shape}; expected (N, H, W, 3) or (N, 3, H, W)")
    images = NpzImages(tuple(int(s) for s in shape), nhwc)
    declared = math.prod(shape)
    if declared != data_bytes:
        raise BadImageArray(
            f"{where} declares {shape} ({declared} bytes) but the file holds {data_bytes} bytes of image data: "
            "it is truncated or was not written by numpy; write it again"
        )
    return images


def npz_images(
    path: str | os.PathLike[str],
    key: str = "arr_0",
    limits: ImageLimits = DEFAULT_LIMITS,
    image_size: tuple[int, int] | None = None,
) -> NpzImages:
    """The image array's header, checked before any image is read: a C-order uint8 ``(N, H, W, 3)`` (or
    ``(N, 3, H, W)``) array, every image within ``limits``, exactly the declared bytes in the zip member, and
    ``(H, W) == image_size`` when given (the reference's). Raises :class:`BadImageArray` or
    :class:`~dip_lightning.core.data.preprocess.ImageTooLarge`."""
    with _open_npz(path) as zf:
        shape, fortran, dtype, data_bytes = _member_header(zf, _npz_member(zf, key))
    images = _checked_header(path, key, shape, fortran, dtype, data_bytes)
    height, width = images.size
    limits.check_decoded(width, height, 3, f"{path}:{key}: each image")
    if image_size is not None and tuple(image_size) != (height, width):
        raise BadImageArray(
            f"{path}:{key} holds {height}x{width} images but the reference's are {image_size[0]}x{image_size[1]}: "
            "compare samples with a reference of their resolution"
        )
    return images


def npz_image_count(path: str | os.PathLike[str], key: str = "arr_0") -> int:
    """Number of images in an npz sample file, read from the array header only."""
    with _open_npz(path) as zf, zf.open(_npz_member(zf, key)) as f:
        shape, _, _ = _read_npy_header(f)
    return int(shape[0])


def iter_npz_images(
    path: str | os.PathLike[str],
    batch_size: int,
    limit: int | None = None,
    key: str = "arr_0",
    start: int = 0,
    limits: ImageLimits = DEFAULT_LIMITS,
    image_size: tuple[int, int] | None = None,
) -> Iterator[Tensor]:
    """Stream uint8 images from an npz (ADM layout: ``arr_0`` NHWC uint8; NCHW accepted) as ``(B, 3, H, W)``.

    The array is read from the zip member batch by batch, so a 50k x 256² sample file (~10 GB) never has to
    fit in memory, as ``np.load(...)["arr_0"]`` would require. Images ``start .. limit - 1`` are read (``limit``
    None: to the end), so ranks can each read their own slice. The header is checked first (:func:`npz_images`,
    with ``limits`` and ``image_size``).
    """
    images = npz_images(path, key, limits, image_size)
    shape, nhwc = images.shape, images.nhwc
    with _open_npz(path) as zf, zf.open(_npz_member(zf, key)) as f:
        _read_npy_header(f)
        total = shape[0] if limit is None else min(shape[0], limit)
        per_image = int(np.prod(shape[1:]))
        done = min(start, total)
        if done:
            f.seek(f.tell() + done * per_image)
        while done < total:
            n = min(batch_size, total - done)
            buf = f.read(n * per_image)
            if len(buf) != n * per_image:
                raise BadImageArray(f"{path}:{key} is truncated: write the file again")
            batch = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:]).copy())
            yield batch.permute(0, 3, 1, 2).contiguous() if nhwc else batch
            done += n


def iter_shard_images(
    shards: str | list[str],
    batch_size: int,
    image_size: int | None = None,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    labelled: bool = False,
) -> Iterator[Any]:
    """Stream real uint8 images ``(B, 3, S, S)`` from WebDataset shards, in shard order (no shuffling); with
    ``labelled``, ``(images, labels)`` pairs (int64 labels, the shards' ``cls``).

    Decoding goes through the data package (`dip_lightning.core.data.shards.decode_sample`): images that are not
    ``image_size`` square get the ADM centre crop, the preprocessing of the ADM reference batches. Training
    augmentations (flips) are not applied. With ``world_size > 1`` every rank reads the same stream and keeps
    every ``world_size``-th of the first ``limit`` images, so the ranks' images are disjoint and together are
    exactly the single-process set. A corrupt or truncated shard raises instead of silently ending early.
    """
    from dip_lightning.core.data.shards import decode_sample, expand_shards, stream_samples

    def fail(exc: BaseException) -> None:
        raise exc

    def emit(images: list[np.ndarray], labels: list[int]) -> Any:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return (batch, np.asarray(labels, dtype=np.int64)) if labelled else batch

    images: list[np.ndarray] = []
    labels: list[int] = []
    index = 0
    for url in expand_shards(shards):
        for sample in stream_samples(url, on_error=fail):
            if limit is not None and index >= limit:
                break
            index += 1
            if (index - 1) % world_size != rank:
                continue
            image, label = decode_sample(sample, image_size)
            images.append(image)
            labels.append(label)
            if len(images) == batch_size:
                yield emit(images, labels)
                images, labels = [], []
        if limit is not None and index >= limit:
            break
    if images:
        yield emit(images, labels)


def npz_labels(path: str | os.PathLike[str], count: int, key: str = "arr_1") -> np.ndarray | None:
    """The class labels stored beside an npz's ``count`` images (``arr_1``, as `sample` and ADM's sampling scripts
    write them) as int64, or None where the file has none. The header is checked before the array is read: one
    integer per image."""
    with _open_npz(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            return None
        shape, fortran, dtype, stored = _member_header(zf, name)
    declared = math.prod(shape) * dtype.itemsize
    if dtype.kind not in "iu" or len(shape) != 1 or shape[0] != count or declared != stored:
        raise BadImageArray(
            f"{path}:{key} should hold one integer class label per image ({count}), but holds {dtype} {shape} "
            f"({stored} of {declared} bytes); write the file again, or drop {key} to evaluate without labels"
        )
    with _open_npz(path) as zf, zf.open(name) as f:
        _read_npy_header(f)
        return np.frombuffer(f.read(declared), dtype=dtype).astype(np.int64)


def npz_image_shape(path: str | os.PathLike[str], key: str = "arr_0") -> tuple[int, ...]:
    """Shape of an npz image array, read from the array header only."""
    with _open_npz(path) as zf, zf.open(_npz_member(zf, key)) as f:
        shape, _, _ = _read_npy_header(f)
    return tuple(int(s) for s in shape)
