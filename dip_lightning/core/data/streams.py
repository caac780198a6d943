"""Seekable training stream and deterministic validation pass over WebDataset shards (torch only).

See :mod:`dip_lightning.core.data.datamodule` for the design; this module does not import Lightning, so
tools such as ``python -m dip_lightning fid-stats`` can use :func:`iter_image_batches` cheaply.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dip_lightning.core.data.preprocess import DEFAULT_LIMITS, ImageLimits
from dip_lightning.core.data.shards import (
    decode_sample,
    expand_shards,
    is_random_access,
    local_reader,
    shard_sample_counts,
    stream_samples,
)
from dip_lightning.core.errors import ConfigError, KitError
from dip_lightning.core.seeding import hash64

_MAX_WORKER_ROWS = 257  # counters: row 0 = main process, row w + 1 = DataLoader worker w
_MIN_SAMPLES_FOR_BAD_CHECK = 256
_WARN_FIRST = 10

Ref = tuple[int, int]  # (shard index, sample ordinal inside the shard)

# Tags that keep the stream's hashed draws (dip_lightning.core.seeding.hash64) apart.
_TAG_CHOICE, _TAG_FLIP, _TAG_PERM, _TAG_CROP = 0x51, 0xF1, 0x9E, 0xC7


class TooMuchBadData(KitError, RuntimeError):
    """More than ``max_bad_fraction`` of the samples read were unreadable (or missing from their shard)."""


# ------------------------------------------------------------------------------------------ plan
class TrainPlan:
    """The infinite per-rank sample sequence: position -> (shard index, sample ordinal). Pure."""

    def __init__(self, sizes: Sequence[int], seed: int, rank: int, mix: int = 1) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if self.sizes.size == 0 or self.sizes.sum() == 0:
            raise ConfigError("the training shards hold no samples")
        self.seed, self.rank, self.mix = int(seed), int(rank), max(1, int(mix))
        self._ends = np.zeros(0, dtype=np.int64)  # cumulative end position of each segment so far
        self._segments: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _choices(self, js: np.ndarray) -> np.ndarray:
        h = hash64(self.seed, _TAG_CHOICE, self.rank, js[:, None], np.arange(self.mix)[None, :])
        return (h % np.uint64(self.sizes.size)).astype(np.int64)

    def _extend(self, pos: int) -> None:
        # Segment ends are computed in vectorised chunks; a run of 10^9 samples needs ~10^5 segments.
        while self._ends.size == 0 or self._ends[-1] <= pos:
            j0 = self._ends.size
            lengths = self.sizes[self._choices(np.arange(j0, j0 + 4096))].sum(axis=1)
            base = self._ends[-1] if j0 else 0
            self._ends = np.concatenate([self._ends, base + np.cumsum(lengths)])

    def segment(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """``(shard indices, ordinals)`` of segment ``j`` in visiting order."""
        seg = self._segments.get(j)
        if seg is None:
            chosen = self._choices(np.asarray([j]))[0]
            shards = np.repeat(chosen, self.sizes[chosen])
            ordinals = np.concatenate([np.arange(self.sizes[c]) for c in chosen])
            rng = np.random.Generator(np.random.PCG64([self.seed, _TAG_PERM, self.rank, j]))
            perm = rng.permutation(shards.size)
            seg = (shards[perm], ordinals[perm])
            self._segments[j] = seg
            if len(self._segments) > 4:
                self._segments.popitem(last=False)
        return seg

    def refs(self, start: int, stop: int) -> list[Ref]:
        """Samples at positions ``[start, stop)``."""
        self._extend(stop - 1)
        out: list[Ref] = []
        pos = start
        while pos < stop:
            j = int(np.searchsorted(self._ends, pos, side="right"))
            seg_start = int(self._ends[j - 1]) if j else 0
            shards, ordinals = self.segment(j)
            a, b = pos - seg_start, min(stop, int(self._ends[j])) - seg_start
            out.extend(zip(shards[a:b].tolist(), ordinals[a:b].tolist()))
            pos = seg_start + b
        return out

    def segment_end(self, pos: int) -> int:
        """First position after the segment that holds position ``pos``."""
        self._extend(pos)
        return int(self._ends[int(np.searchsorted(self._ends, pos, side="right"))])

    def flips(self, start: int, stop: int) -> np.ndarray:
        return (hash64(self.seed, _TAG_FLIP, self.rank, np.arange(start, stop)) & np.uint64(1)).astype(bool)

    def crop_offsets(self, start: int, stop: int) -> np.ndarray:
        """Random-crop positions in [0, 1) of the samples at positions ``[start, stop)`` (53-bit hashes)."""
        h = hash64(self.seed, _TAG_CROP, self.rank, np.arange(start, stop)) >> np.uint64(11)
        return h.astype(np.float64) / float(2**53)

    def segment_span(self) -> int:
        """An upper bound on a segment's length (for remote look-ahead)."""
        return int(self.mix * self.sizes.max())


# ------------------------------------------------------------------------------------------ base reader
class _ShardBatchDataset(IterableDataset):
    """Reading, decoding, bad-sample accounting, batch assembly and the pass shared by train and val streams.

    A stream says which batches a worker makes (``_batch_ids``), which samples a batch holds (``batch_refs``),
    how a batch is made of them (``make_batch``) and how far apart one streamed shard's samples can be
    (``_shard_visit_span``).
    """

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int],
        image_size: int,
        batch_size: int,
        num_classes: int | None,
        max_bad_fraction: float,
        limits: ImageLimits | None = None,
    ) -> None:
        super().__init__()
        if len(urls) != len(sizes):
            raise ValueError("urls and sizes differ in length")
        self.urls = list(urls)
        self.sizes = [int(s) for s in sizes]
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.num_classes = num_classes
        self.max_bad_fraction = float(max_bad_fraction)
        self.limits = limits if limits is not None else DEFAULT_LIMITS
        self.random_access = [is_random_access(u) for u in self.urls]
        # Shared with the DataLoader workers (fork or spawn): [samples read, bad samples] per process.
        self.counters = torch.zeros(_MAX_WORKER_ROWS, 2, dtype=torch.int64).share_memory_()
        self._remote_cache: dict[Ref, dict | BaseException] = {}

    # -- worker identity
    @staticmethod
    def _worker() -> tuple[int, int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 1, 0
        if info.id + 1 >= _MAX_WORKER_ROWS:
            raise ConfigError(f"at most {_MAX_WORKER_ROWS - 1} workers are supported")
        return info.id, info.num_workers, info.id + 1

    # -- the pass
    def _batch_ids(self, worker: int, num_workers: int) -> Iterable[int]:  # pragma: no cover - abstract
        """The batches this worker makes in one pass, in order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers, row = self._worker()
        ids = self._batch_ids(worker, num_workers)
        depth = self._lookahead_batches(num_workers)
        for b, nxt in self._with_lookahead(ids, depth):
            upcoming = [self.batch_refs(n) for n in nxt] if depth else []
            yield self.make_batch(b, row, upcoming)

    # -- reading
    def _shard_visit_span(self) -> int:  # pragma: no cover - abstract
        """An upper bound on the samples between the first and the last read of one streamed shard."""
        raise NotImplementedError

    def _lookahead_batches(self, num_workers: int) -> int:
        """How many of its next batches a worker reads ahead: enough that a streamed (not random-access) shard
        is read once for all the batches that need it."""
        if all(self.random_access):
            return 0
        return math.ceil(self._shard_visit_span() / (self.batch_size * num_workers)) + 1

    def _read(self, refs: Sequence[Ref], upcoming: Sequence[Sequence[Ref]]) -> list[dict | BaseException]:
        out: list[dict | BaseException] = []
        for ref in refs:
            shard, ordinal = ref
            if self.random_access[shard]:
                try:
                    out.append(local_reader().read(self.urls[shard], ordinal, self.limits))
                except Exception as exc:  # noqa: BLE001 - reported as a bad sample
                    out.append(exc)
            else:
                out.append(self._remote(ref, refs, upcoming))
        if self._remote_cache:
            keep = {r for batch in upcoming for r in batch}
            self._remote_cache = {r: v for r, v in self._remote_cache.items() if r in keep}
        return out

    def _remote(
        self, ref: Ref, current: Sequence[Ref], upcoming: Sequence[Sequence[Ref]]
    ) -> dict | BaseException:
        if ref not in self._remote_cache:
            # Stream the shard once and keep every member this worker needs from it in the look-ahead.
            shard = ref[0]
            wanted = {o for s, o in current if s == shard}
            wanted |= {o for batch in upcoming for s, o in batch if s == shard}
            errors: list[BaseException] = []
            found: dict[int, dict] = {}
            for i, sample in enumerate(stream_samples(self.urls[shard], errors.append)):
                if i in wanted:
                    found[i] = sample
                if len(found) == len(wanted):
                    break
            why = f": {errors[0]}" if errors else ""
            for o in wanted:
                self._remote_cache[(shard, o)] = found.get(o) or IndexError(
                    f"sample {o} missing from {self.urls[shard]}{why}"
                )
        value = self._remote_cache[ref]
        return value

    # -- bad samples
    def _report_bad(self, row: int, ref: Ref, exc: BaseException) -> None:
        shard, ordinal = ref
        url = self.urls[shard]
        n_bad = int(self.counters[row, 1])
        if n_bad <= _WARN_FIRST or n_bad % 100 == 0:
            key = local_reader().key(url, ordinal) if self.random_access[shard] else f"#{ordinal}"
            more = " (further bad samples are reported every 100th)" if n_bad == _WARN_FIRST else ""
            warnings.warn(
                f"skipping bad sample {key} of {url}: {type(exc).__name__}: {exc} "
                f"[{n_bad} bad of {int(self.counters[row, 0])} read in this process]{more}",
                RuntimeWarning,
                stacklevel=2,
            )

    def _check_bad_fraction(self, row: int) -> None:
        read, bad = (int(v) for v in self.counters[row])
        if read >= _MIN_SAMPLES_FOR_BAD_CHECK and bad > self.max_bad_fraction * read:
            raise TooMuchBadData(
                f"{bad} of {read} samples read by this data process were unreadable or missing "
                f"(> max_bad_fraction={self.max_bad_fraction}); refusing to train on damaged data. "
                f"Check the shards ({self.urls[0]} ...) or raise max_bad_fraction."
            )

    # -- decoding
    def _decode_batch(
        self,
        refs: Sequence[Ref],
        raw: Sequence[dict | BaseException],
        row: int,
        crop_offsets: np.ndarray | None = None,
    ) -> tuple[list[np.ndarray | None], list[int]]:
        images: list[np.ndarray | None] = []
        labels: list[int] = []
        self.counters[row, 0] += len(refs)  # one shared-memory update per batch, not per sample
        for i, (ref, sample) in enumerate(zip(refs, raw)):
            try:
                if isinstance(sample, BaseException):
                    raise sample
                offset = None if crop_offsets is None else float(crop_offsets[i])
                arr, label = decode_sample(sample, self.image_size, offset, self.limits)
                if arr.shape != (self.image_size, self.image_size, 3):
                    raise ValueError(f"decoded to shape {arr.shape}")
            except Exception as exc:  # noqa: BLE001 - counted, warned, replaced
                self.counters[row, 1] += 1
                self._report_bad(row, ref, exc)
                images.append(None)
                labels.append(-1)
                continue
            if self.num_classes is not None and not 0 <= label < self.num_classes:
                raise ConfigError(
                    f"label {label} of sample {ref[1]} in {self.urls[ref[0]]} is outside "
                    f"[0, num_classes={self.num_classes}): the shards hold more classes than the model; set "
                    "model.net.init_args.num_classes (the data's class count follows the model's)"
                )
            images.append(arr)
            labels.append(label)
        return images, labels

    def _assemble(
        self, images: Sequence[np.ndarray], labels: Sequence[int], flips: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, size = len(images), self.image_size
        out = torch.empty((n, size, size, 3), dtype=torch.uint8)
        if get_worker_info() is not None:
            out.share_memory_()  # filled in place: the DataLoader then sends it without another copy
        view = out.numpy()
        for i, arr in enumerate(images):
            view[i] = arr[:, ::-1] if flips is not None and flips[i] else arr
        return out.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)

    @staticmethod
    def _with_lookahead(ids: Iterable[int], depth: int) -> Iterator[tuple[int, list[int]]]:
        """``(batch id, the next ``depth`` batch ids of this worker)``."""
        it = iter(ids)
        window: list[int] = []
        for b in it:
            window.append(b)
            if len(window) > depth:
                break
        while window:
            b = window.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                window.append(nxt)
            yield b, list(window)


# ------------------------------------------------------------------------------------------ train
class TrainShardStream(_ShardBatchDataset):
    """Infinite, seekable per-rank training stream; one pass of the loader = ``batches_per_epoch``."""

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int],
        *,
        image_size: int,
        batch_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        mix: int = 1,
        random_flip: bool = False,
        random_crop: bool = False,
        num_classes: int | None = None,
        max_bad_fraction: float = 0.01,
        limits: ImageLimits | None = None,
    ) -> None:
        super().__init__(urls, sizes, image_size, batch_size, num_classes, max_bad_fraction, limits)
        self.plan = TrainPlan(self.sizes, seed, rank, mix)
        self.batches_per_epoch = int(batches_per_epoch)
        self.random_flip = bool(random_flip)
        self.random_crop = bool(random_crop)
        # Where the next pass starts; shared memory so that persistent workers see updates. The main
        # process advances `cursor` batch by batch; workers read `pass_start`, the snapshot taken when
        # the pass begins (PositionedDataLoader.__iter__), so a worker that starts late does not skip.
        self.cursor = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.pass_start = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def seek(self, batch: int) -> None:
        """Start the next pass at global batch ``batch`` (restoring a position, or before a new pass)."""
        self.cursor[0] = batch
        self.pass_start[0] = batch

    def batch_refs(self, b: int) -> list[Ref]:
        """The ``(shard, ordinal)`` of every sample of batch ``b`` (a pure function)."""
        return self.plan.refs(b * self.batch_size, (b + 1) * self.batch_size)

    def _shard_visit_span(self) -> int:
        return self.plan.segment_span()

    def make_batch(
        self, b: int, row: int = 0, upcoming: Sequence[Sequence[Ref]] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b`` as ``(uint8 images (B, 3, H, W), int64 labels (B,))``."""
        B = self.batch_size
        refs = self.batch_refs(b)
        crops = self.plan.crop_offsets(b * B, (b + 1) * B) if self.random_crop else None
        images, labels = self._decode_batch(refs, self._read(refs, upcoming), row, crops)
        good = [i for i, im in enumerate(images) if im is not None]
        pos, tries = (b + 1) * B, 0
        while not good and tries < 8:
            # The whole batch is unreadable (e.g. a corrupt shard and shuffle_buffer=0): borrow the
            # first samples of the following segments, which draw other shards. Deterministic, and
            # rare enough that the duplicated samples do not matter.
            pos = self.plan.segment_end(pos - 1)
            more = self.plan.refs(pos, pos + B)
            crops = self.plan.crop_offsets(pos, pos + B) if self.random_crop else None
            images, labels = self._decode_batch(more, self._read(more, ()), row, crops)
            good = [i for i, im in enumerate(images) if im is not None]
            tries += 1
            pos += 1
        self._check_bad_fraction(row)
        if not good:
            raise TooMuchBadData(f"no readable sample in batch {b} nor in the {tries} segments after it")
        for k, i in enumerate([i for i, im in enumerate(images) if im is None]):
            j = good[k % len(good)]
            images[i], labels[i] = images[j], labels[j]
        # The released random_crop includes the horizontal flip (p = 1/2).
        flips = self.plan.flips(b * B, (b + 1) * B) if self.random_flip or self.random_crop else None
        return self._assemble(images, labels, flips)

    def _batch_ids(self, worker: int, num_workers: int) -> Iterable[int]:
        # In the main process (num_workers=0) the cursor is read once, before any batch of this pass is
        # consumed; in a worker, the snapshot taken at the start of the pass.
        in_worker = torch.utils.data.get_worker_info() is not None
        start = int(self.pass_start[0] if in_worker else self.cursor[0])
        return range(start + worker, start + self.batches_per_epoch, num_workers)


# ------------------------------------------------------------------------------------------ val
class ValShardStream(_ShardBatchDataset):
    """Finite, deterministic pass: rank ``r`` gets global samples ``r, r + world_size, ...``.

    Every rank gets exactly ``total // world_size`` samples (the ``< world_size`` left over are dropped
    with a warning), hence the same number of batches: nothing collective in validation can hang.
    Order: shards in the given order, samples in tar order. Unreadable samples are dropped from their
    batch (counted and warned).
    """

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int],
        *,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
        num_classes: int | None = None,
        max_bad_fraction: float = 0.01,
        limits: ImageLimits | None = None,
    ) -> None:
        super().__init__(urls, sizes, image_size, batch_size, num_classes, max_bad_fraction, limits)
        total = sum(self.sizes) if max_samples is None else min(sum(self.sizes), int(max_samples))
        self.rank, self.world_size = int(rank), int(world_size)
        self.samples_per_rank = total // self.world_size
        self.dropped = total - self.samples_per_rank * self.world_size
        if self.samples_per_rank == 0:
            raise ConfigError(f"{total} validation samples cannot be split over {world_size} ranks")
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return math.ceil(self.samples_per_rank / self.batch_size)

    def batch_refs(self, b: int) -> list[Ref]:
        k = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.samples_per_rank))
        g = k * self.world_size + self.rank
        shard = np.searchsorted(self._starts, g, side="right") - 1
        return list(zip(shard.tolist(), (g - self._starts[shard]).tolist()))

    def _shard_visit_span(self) -> int:
        return max(self.sizes)

    def make_batch(
        self, b: int, row: int = 0, upcoming: Sequence[Sequence[Ref]] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation batch ``b`` (unreadable samples dropped)."""
        refs = self.batch_refs(b)
        images, labels = self._decode_batch(refs, self._read(refs, upcoming), row)
        keep = [i for i, im in enumerate(images) if im is not None]
        self._check_bad_fraction(row)
        if not keep:
            raise TooMuchBadData(f"validation batch {b}: no readable sample ({self.urls[refs[0][0]]})")
        return self._assemble([images[i] for i in keep], [labels[i] for i in keep], None)

    def _batch_ids(self, worker: int, num_workers: int) -> Iterable[int]:
        return range(worker, len(self), num_workers)


# ------------------------------------------------------------------------------------------ helpers
def count_samples(shards: str | Sequence[str]) -> int:
    """Total number of samples in a shard pattern (manifest or header scan)."""
    return sum(shard_sample_counts(expand_shards(shards)))


def manifest_image_size(urls: Sequence[str]) -> int | None:
    import json

    for url in urls:
        if not is_random_access(url):
            return None
        folder = os.path.dirname(os.path.abspath(url))
        name = os.path.basename(url)
        prefix = name.rsplit("-", 1)[0]
        for cand in (f"{prefix}-manifest.json", "manifest.json"):
            path = os.path.join(folder, cand)
            if os.path.isfile(path):
                with open(path) as f:
                    manifest = json.load(f)
                if not manifest.get("crop_at_load", False):
                    return int(manifest["image_size"])
        return None
    return None


def iter_image_batches(
    shards: str | Sequence[str],
    batch_size: int = 64,
    image_size: int | None = None,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Single-process, deterministic pass over shards: ``(uint8 (B, 3, H, W), int64 (B,))`` batches.

    Same order as ``ShardDataModule.val_dataloader`` (shards as given, samples in tar order). For FID
    reference statistics: images not already ``image_size`` square get the ADM crop. ``image_size=None``
    takes the size from the prepare manifest, else from the first image.
    """
    urls = expand_shards(shards)
    sizes = shard_sample_counts(urls)
    if image_size is None:
        image_size = manifest_image_size(urls)
    if image_size is None:
        first = next(i for i, n in enumerate(sizes) if n > 0)
        sample = (
            local_reader().read(urls[first], 0)
            if is_random_access(urls[first])
            else next(iter(stream_samples(urls[first])))
        )
        image_size = int(decode_sample(sample, None)[0].shape[0])
    stream = ValShardStream(
        urls,
        sizes,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        max_samples=max_samples,
        max_bad_fraction=1.0,
    )
    yield from stream
