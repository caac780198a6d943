"""Image sources of the metrics engine: uint8 batches streamed from an npz (ADM layout) or WebDataset shards."""

from __future__ import annotations

import contextlib
import os
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dip_lightning.core.metrics.errors import ImageFileError

__all__ = ["iter_npz_images", "iter_shard_images", "npz_image_count", "npz_image_shape"]


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open ``.npy`` stream, leaving it positioned at the data."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _npz_member(zf: zipfile.ZipFile, key: str) -> str:
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise ImageFileError(
            f"{zf.filename}: no {key!r} array (members: {zf.namelist()}); an image npz holds uint8 images "
            "(N, H, W, 3) under arr_0, as `sample` writes them"
        )
    return name


#: What zipfile, zlib and numpy raise for a file that is no (complete) npz.
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)


def _unreadable(path: str | os.PathLike[str], err: BaseException) -> ImageFileError:
    return ImageFileError(
        f"{path}: not a readable npz ({type(err).__name__}: {err}); it is damaged, incomplete or no npz at all: "
        "write it again (`sample` writes the ADM layout)"
    )


@contextlib.contextmanager
def _npz_array(
    path: str | os.PathLike[str], key: str
) -> Iterator[tuple[Any, tuple[int, ...], bool, np.dtype]]:
    """The open ``.npy`` member ``key`` of an npz, positioned at its data, and (shape, fortran_order, dtype) from
    its header; a file that is no readable npz is an :class:`ImageFileError` naming it."""
    with contextlib.ExitStack() as stack:
        try:
            zf = stack.enter_context(zipfile.ZipFile(path))
            f = stack.enter_context(zf.open(_npz_member(zf, key)))
            shape, fortran, dtype = _read_npy_header(f)
        except _DAMAGED as err:
            if isinstance(err, ImageFileError):
                raise
            raise _unreadable(path, err) from err
        try:
            yield f, shape, fortran, dtype
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # found while reading the data (a bad CRC)
            raise _unreadable(path, err) from err


def npz_image_count(path: str | os.PathLike[str], key: str = "arr_0") -> int:
    """Number of images in an npz sample file, read from the array header only."""
    with _npz_array(path, key) as (_, shape, _, _):
        return int(shape[0])


def iter_npz_images(
    path: str | os.PathLike[str],
    batch_size: int,
    limit: int | None = None,
    key: str = "arr_0",
    start: int = 0,
) -> Iterator[Tensor]:
    """Stream uint8 images from an npz (ADM layout: ``arr_0`` NHWC uint8; NCHW accepted) as ``(B, 3, H, W)``.

    The array is read from the zip member batch by batch, so a 50k x 256² sample file (~10 GB) never has to
    fit in memory, as ``np.load(...)["arr_0"]`` would require. Images ``start .. limit - 1`` are read (``limit``
    None: to the end), so ranks can each read their own slice.
    """
    with _npz_array(path, key) as (f, shape, fortran, dtype):
        if dtype != np.uint8 or len(shape) != 4 or fortran:
            raise ImageFileError(
                f"{path}:{key} must be a C-order uint8 (N, H, W, 3) array, got {dtype} {shape}"
            )
        nhwc = shape[-1] == 3
        if not nhwc and shape[1] != 3:
            raise ImageFileError(f"{path}:{key} has shape {shape}; expected (N, H, W, 3) or (N, 3, H, W)")
        total = shape[0] if limit is None else min(shape[0], limit)
        per_image = int(np.prod(shape[1:]))
        done = min(start, total)
        if done:
            f.seek(f.tell() + done * per_image)
        while done < total:
            n = min(batch_size, total - done)
            buf = f.read(n * per_image)
            if len(buf) != n * per_image:
                raise ImageFileError(f"{path}:{key} is truncated: write the file again")
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
) -> Iterator[Tensor]:
    """Stream real uint8 images ``(B, 3, S, S)`` from WebDataset shards, in shard order (no shuffling).

    Decoding goes through the data package (`dip_lightning.core.data.shards.decode_sample`): images that are not
    ``image_size`` square get the ADM centre crop, the preprocessing of the ADM reference batches. Training
    augmentations (flips) are not applied. With ``world_size > 1`` every rank reads the same stream and keeps
    every ``world_size``-th of the first ``limit`` images, so the ranks' images are disjoint and together are
    exactly the single-process set. A corrupt or truncated shard raises instead of silently ending early.
    """
    from dip_lightning.core.data.shards import decode_sample, expand_shards, stream_samples

    def fail(exc: BaseException) -> None:
        raise exc

    batch: list[np.ndarray] = []
    index = 0
    for url in expand_shards(shards):
        for sample in stream_samples(url, on_error=fail):
            if limit is not None and index >= limit:
                break
            index += 1
            if (index - 1) % world_size != rank:
                continue
            image, _ = decode_sample(sample, image_size)
            batch.append(image)
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
                batch = []
        if limit is not None and index >= limit:
            break
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def npz_image_shape(path: str | os.PathLike[str], key: str = "arr_0") -> tuple[int, ...]:
    """Shape of an npz image array, read from the array header only."""
    with _npz_array(path, key) as (_, shape, _, _):
        return tuple(int(s) for s in shape)
