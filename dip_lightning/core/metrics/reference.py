"""Feature sets of image collections, and the references samples are compared with.

A `FeatureSet` holds per-image features of each kind (``pool``, ``spatial``, ``probs``, ``dinov2``; float32, as the
ADM evaluator keeps activations) and the `SeamProfile`; statistics are computed from it in float64. A `Reference`
loads from an image npz (``arr_0``, uint8 NHWC), an ADM reference batch (its stored ``mu``/``sigma`` used as ADM's
evaluator uses them, its images for the rest) or the kit's reference file (`save_reference`, written by
``fid-stats``: Inception and DINOv2 statistics, up to 10k pool features for precision/recall with their class
labels where the images had them, the seam profile).
Features extracted from a file's images are cached by the file's content hash and the network's name.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dip_lightning.core.atomic import atomic_write
from dip_lightning.core.distributed import all_gather_rows, is_distributed, rank_and_world
from dip_lightning.core.metrics.errors import MetricsError
from dip_lightning.core.metrics.features import FeatureExtractor
from dip_lightning.core.metrics.frechet import FIDStats
from dip_lightning.core.metrics.patch_seam import SeamProfile
from dip_lightning.core.metrics.sources import (
    iter_npz_images,
    npz_array_sizes,
    npz_image_shape,
    npz_images,
    npz_labels,
)

__all__ = [
    "CACHE_ENV",
    "FeatureSet",
    "MetricUnavailableWarning",
    "PR_REFERENCE_SIZE",
    "Reference",
    "check_reference_file",
    "default_cache_dir",
    "extract_feature_set",
    "file_digest",
    "gather_feature_set",
    "load_reference",
    "reference_from_features",
    "reference_image_size",
    "save_reference",
]

#: Environment variable that moves the feature cache (default ``~/.cache/dip_lightning/metrics``).
CACHE_ENV = "DIP_METRICS_CACHE"
#: Per-image pool features a reference file keeps for precision/recall (ADM's reference batches: 10k images).
PR_REFERENCE_SIZE = 10000
#: Largest statistics array a reference may declare (Inception's sigma: 32 MB; 10k pool features: 80 MB).
MAX_STATISTICS_BYTES = 2**30
#: Inception feature kinds that are extracted per image.
INCEPTION_KINDS = ("pool", "spatial", "probs")


class BadReferenceFile(MetricsError):
    """A reference file that cannot serve: no npz, neither images nor statistics, statistics arrays that are not
    what their headers declare or implausibly large (unread), of inconsistent shape or holding NaN/inf, made with
    another feature network than the samples', or too few images."""


class MetricUnavailableWarning(UserWarning):
    """A metric was asked for but cannot be computed here (no weights, no patch size, an old reference)."""


def warn_unavailable(metric: str, why: str) -> None:
    warnings.warn(f"{metric}: not computed: {why}", MetricUnavailableWarning, stacklevel=3)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dip_lightning" / "metrics")


# ----------------------------------------------------------------------------------------------------------
# Feature sets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Per-image features by kind (float32 ``(N, d)``) and the seam profile of one set of images."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    seam: SeamProfile | None = None
    num_images: int = 0
    extractor: str = ""
    #: Class label of each image (int64 ``(N,)``), where the images came with labels; for class agreement.
    labels: np.ndarray | None = None

    def stats(self, kind: str) -> FIDStats:
        return FIDStats.from_features(self.features[kind], self.extractor)


def extract_feature_set(
    batches: Iterable[Tensor | tuple[Tensor, np.ndarray]],
    kinds: Collection[str],
    extractor: FeatureExtractor | None,
    device: torch.device,
    dinov2: nn.Module | None = None,
    progress: Callable[[int], None] | None = None,
) -> FeatureSet:
    """Features of ``kinds`` (Inception kinds, ``dinov2``, ``seam``) for a stream of uint8 ``(B, 3, H, W)``, or of
    ``(images, labels)`` pairs: the labels are then kept (`FeatureSet.labels`; None unless every batch has them)."""
    inception = [k for k in INCEPTION_KINDS if k in kinds]
    if inception and extractor is None:
        raise ValueError(f"{inception} features need an Inception extractor")
    if "dinov2" in kinds and dinov2 is None:
        raise ValueError("dinov2 features need a DINOv2Features network")
    parts: dict[str, list[Tensor]] = {k: [] for k in (*inception, *(["dinov2"] if "dinov2" in kinds else []))}
    seam: SeamProfile | None = None
    count = 0
    labels: list[np.ndarray] | None = []
    for batch in batches:
        batch, batch_labels = batch if isinstance(batch, tuple) else (batch, None)
        labels = _kept_labels(labels, batch_labels)
        images = batch.to(device, non_blocking=True)
        if inception:
            assert extractor is not None
            for kind, value in extractor.features(images, inception).items():
                parts[kind].append(value.float().cpu())
        if "dinov2" in kinds:
            assert dinov2 is not None
            parts["dinov2"].append(dinov2(images).float().cpu())
        if "seam" in kinds:
            profile = SeamProfile.of_images(images)
            seam = profile if seam is None else seam + profile
        count += int(images.shape[0])
        if progress is not None:
            progress(count)
    features = {k: torch.cat(v).numpy() if v else np.zeros((0, 0), np.float32) for k, v in parts.items()}
    if "seam" in kinds and seam is None:
        seam = SeamProfile(np.zeros(0), np.zeros(0), 0)
    name = extractor.name if extractor is not None else ""
    return FeatureSet(features, seam, count, name, _joined_labels(labels, count))


def _kept_labels(parts: list[np.ndarray] | None, new: Tensor | np.ndarray | None) -> list[np.ndarray] | None:
    """``parts`` with a batch's labels appended; None from the first batch without labels on."""
    if parts is None or new is None:
        return None
    parts.append(np.asarray(new, dtype=np.int64))
    return parts


def _joined_labels(parts: list[np.ndarray] | None, count: int) -> np.ndarray | None:
    """The batches' labels as one int64 array of ``count`` (None: some batch had none)."""
    if parts is None:
        return None
    labels = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, np.int64)
    if len(labels) != count:
        raise ValueError(f"{count} images but {len(labels)} labels")
    return labels


def gather_feature_set(local: FeatureSet) -> FeatureSet:
    """Every rank's features concatenated in rank order and the seam profiles summed (collective)."""
    if not is_distributed():
        return local
    features = {
        k: all_gather_rows(torch.from_numpy(np.ascontiguousarray(v))).numpy()
        for k, v in local.features.items()
    }
    seam = None
    if local.seam is not None:
        packed = torch.from_numpy(np.concatenate([local.seam.cols, local.seam.rows, [local.seam.num_images]]))
        gathered = all_gather_rows(packed[None]).sum(0).numpy()
        n_cols = len(local.seam.cols)
        seam = SeamProfile(gathered[:n_cols], gathered[n_cols:-1], int(round(gathered[-1])))
    counts = all_gather_rows(torch.tensor([local.num_images]))
    # The labels of every rank, or none: a rank without them makes the whole set unlabelled.
    unlabelled = all_gather_rows(torch.tensor([int(local.labels is None)]))
    labels = None
    if int(unlabelled.sum()) == 0:
        assert local.labels is not None
        labels = all_gather_rows(torch.from_numpy(local.labels)).numpy()
    return FeatureSet(features, seam, int(counts.sum()), local.extractor, labels)


def npz_feature_set(
    path: str | os.PathLike[str],
    kinds: Collection[str],
    extractor: FeatureExtractor | None,
    device: torch.device,
    batch_size: int = 64,
    dinov2: nn.Module | None = None,
    limit: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> FeatureSet:
    """Features of an npz's ``arr_0`` images, with their ``arr_1`` labels where the file has them; under a process
    group each rank reads a contiguous slice. The array's header is checked first (`npz_images`; ``image_size``:
    the reference's, for samples)."""
    count = npz_images(path, image_size=image_size).count
    total = count if limit is None else min(count, limit)
    rank, world = rank_and_world() if is_distributed() else (0, 1)
    bounds = np.linspace(0, total, world + 1).round().astype(int)
    start, stop = int(bounds[rank]), int(bounds[rank + 1])
    batches: Iterable[Tensor | tuple[Tensor, np.ndarray]] = iter_npz_images(
        path, batch_size, limit=stop, start=start, image_size=image_size
    )
    labels = npz_labels(path, count)
    if labels is not None:
        batches = zip(batches, np.split(labels[start:stop], range(batch_size, stop - start, batch_size)))
    return gather_feature_set(extract_feature_set(batches, kinds, extractor, device, dinov2))


# ----------------------------------------------------------------------------------------------------------
# Content-hash cache
# ----------------------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (memoised per path, size and mtime within the process)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _cache_file(cache_dir: Path, digest: str, kind: str, network: str) -> Path:
    return cache_dir / f"{digest[:32]}-{_safe(network) or 'pixels'}-{kind}.npy"


def _cached_features(
    path: str | os.PathLike[str],
    kinds: Collection[str],
    extractor: FeatureExtractor | None,
    device: torch.device,
    batch_size: int,
    dinov2: nn.Module | None,
    cache_dir: Path | None,
) -> FeatureSet:
    """`npz_feature_set` of a file, taking every kind it can from the cache and caching what it extracts."""
    networks = {k: (extractor.name if extractor is not None else "") for k in INCEPTION_KINDS}
    networks["dinov2"] = str(getattr(dinov2, "name", ""))
    networks["seam"] = ""
    digest = file_digest(path) if cache_dir is not None else ""
    found = FeatureSet(extractor=extractor.name if extractor is not None else "")
    missing = []
    for kind in kinds:
        file = _cache_file(cache_dir, digest, kind, networks[kind]) if cache_dir is not None else None
        if file is not None and file.is_file():
            _read_cached(file, kind, found)
        else:
            missing.append(kind)
    if is_distributed():
        # Every rank must take the same branch (the extraction is collective): a cache file that appeared
        # between the ranks' checks (another job) must not split them.
        anyone = all_gather_rows(torch.tensor([[len(missing)]]))
        if int(anyone.sum()) > 0:
            missing = list(kinds)
    if missing:
        fresh = npz_feature_set(path, missing, extractor, device, batch_size, dinov2)
        found.features.update(fresh.features)
        if fresh.seam is not None:
            found.seam = fresh.seam
        rank, _ = rank_and_world()
        if cache_dir is not None and rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for kind in missing:
                _write_cached(_cache_file(cache_dir, digest, kind, networks[kind]), kind, fresh)
    found.num_images = npz_image_shape(path)[0]
    return found


def _read_cached(file: Path, kind: str, into: FeatureSet) -> None:
    value = np.load(file, allow_pickle=False)
    if kind == "seam":  # rows: column profile, row profile, (their lengths, image count)
        n_cols, n_rows, count = (int(v) for v in value[2, :3])
        into.seam = SeamProfile(value[0, :n_cols], value[1, :n_rows], count)
    else:
        into.features[kind] = value


def _write_cached(file: Path, kind: str, features: FeatureSet) -> None:
    if kind == "seam":
        seam = features.seam
        assert seam is not None
        value = np.zeros((3, max(len(seam.cols), len(seam.rows), 3)))
        value[0, : len(seam.cols)] = seam.cols
        value[1, : len(seam.rows)] = seam.rows
        value[2, :3] = (len(seam.cols), len(seam.rows), seam.num_images)
    else:
        value = features.features[kind]
    with atomic_write(file, overwrite=True) as f:
        np.save(f, value)


# ----------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------

#: What each metric needs from the reference.
REFERENCE_NEEDS: dict[str, tuple[str, ...]] = {
    "fid": ("pool_stats",),
    "sfid": ("spatial_stats",),
    "inception_score": (),
    "precision": ("pool_features",),
    "recall": ("pool_features",),
    "patch_seam": ("seam",),
    "fd_dinov2": ("dinov2_stats",),
    "class_agreement": ("pool_features", "pool_labels"),
}
_FROM_IMAGES = {
    "pool_stats": "pool",
    "pool_features": "pool",
    "spatial_stats": "spatial",
    "dinov2_stats": "dinov2",
    "seam": "seam",
}


@dataclass
class Reference:
    """What samples are compared with: statistics by kind, per-image pool features, the seam profile."""

    path: str
    stats: dict[str, FIDStats] = field(default_factory=dict)
    pool_features: np.ndarray | None = None
    seam: SeamProfile | None = None
    #: Inception extractor the statistics were made with ("" when the file does not say: ADM batches).
    extractor: str = ""
    num_images: int = 0
    #: "images", "adm" or "stats".
    layout: str = "images"
    #: ``(height, width)`` of the reference's images, where the file tells (its images, or its seam profile).
    image_size: tuple[int, int] | None = None
    #: Class label of each row of ``pool_features``, where the reference's images came with labels.
    pool_labels: np.ndarray | None = None

    def has(self, need: str) -> bool:
        if need == "pool_features":
            return self.pool_features is not None and len(self.pool_features) > 0
        if need == "seam":
            return self.seam is not None and self.seam.num_images > 0
        if need == "pool_labels":
            return self.pool_labels is not None and self.has("pool_features")
        return need.removesuffix("_stats") in self.stats


#: What zipfile, zlib and numpy raise for a file that is no (complete) npz.
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)
_RECOMPUTE = "recompute it with `python -m dip_lightning fid-stats`, or pass an image npz"


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except zipfile.BadZipFile as err:
        raise BadReferenceFile(
            f"reference {path} is not an npz (zip) file ({err}): pass an image npz, an ADM reference batch or a "
            "reference file from `python -m dip_lightning fid-stats`"
        ) from err


def _check_statistics_headers(path: Path) -> None:
    """Before np.load reads them: every array but the images holds the bytes its header declares, at most
    :data:`MAX_STATISTICS_BYTES` (a few MB of deflated zeros can declare a sigma of many GB)."""
    for key, (declared, stored) in npz_array_sizes(path).items():
        if key == "arr_0":
            continue  # the images: npz_images checks them
        if declared != stored:
            raise BadReferenceFile(
                f"{path}: array {key!r} declares {declared} bytes but the file holds {stored}: truncated or not "
                "written by numpy; recompute it (fid-stats) or copy it again"
            )
        if declared > MAX_STATISTICS_BYTES:
            raise BadReferenceFile(
                f"{path}: array {key!r} declares {declared} bytes, more than any reference statistic needs "
                f"({MAX_STATISTICS_BYTES}); not read"
            )


def _read_stats_file(path: Path, keys: list[str]) -> Reference:
    try:
        return _read_stats_arrays(path, keys)
    except _DAMAGED as err:
        if isinstance(err, BadReferenceFile):
            raise
        raise BadReferenceFile(
            f"reference {path} is damaged or incomplete ({type(err).__name__}: {err}); copy it again or "
            f"{_RECOMPUTE}"
        ) from err


def _check_finite(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Stored statistics or features with NaN or inf make every distance to them NaN: a damaged reference,
    refused before any sample is extracted."""
    bad = [key for key, value in arrays.items() if not np.isfinite(value).all()]
    if bad:
        raise BadReferenceFile(
            f"reference {path}: {' and '.join(bad)} {'hold' if len(bad) > 1 else 'holds'} NaN or infinite "
            f"values, so no distance to it is a number; {_RECOMPUTE}"
        )


def _read_stats_arrays(path: Path, keys: list[str]) -> Reference:
    _check_statistics_headers(path)
    with np.load(path, allow_pickle=False) as npz:

        def stats(mu_key: str, sigma_key: str, extractor: str) -> FIDStats | None:
            if mu_key not in keys or sigma_key not in keys:
                return None
            mu = np.asarray(npz[mu_key], dtype=np.float64)
            sigma = np.asarray(npz[sigma_key], dtype=np.float64)
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise BadReferenceFile(
                    f"reference {path}: inconsistent shapes {mu_key} {mu.shape}, {sigma_key} {sigma.shape}; "
                    f"{_RECOMPUTE}"
                )
            _check_finite(path, {mu_key: mu, sigma_key: sigma})
            return FIDStats(mu, sigma, num, extractor)

        num = int(npz["num_samples"]) if "num_samples" in keys else 0
        extractor = str(npz["extractor"]) if "extractor" in keys else ""
        ref = Reference(str(path), extractor=extractor, num_images=num, layout="stats")
        for kind, (mu_key, sigma_key) in {
            "pool": ("mu", "sigma"),
            "spatial": ("mu_s", "sigma_s"),
        }.items():
            value = stats(mu_key, sigma_key, extractor)
            if value is not None:
                ref.stats[kind] = value
        dinov2_name = str(npz["dinov2_extractor"]) if "dinov2_extractor" in keys else ""
        dinov2 = stats("dinov2_mu", "dinov2_sigma", dinov2_name)
        if dinov2 is not None:
            ref.stats["dinov2"] = dinov2
        if "pool_features" in keys:
            ref.pool_features = np.asarray(npz["pool_features"], dtype=np.float32)
            _check_finite(path, {"pool_features": ref.pool_features})
        if "pool_labels" in keys:
            ref.pool_labels = _pool_labels(path, npz["pool_labels"], ref.pool_features)
        if "seam_cols" in keys:
            ref.seam = SeamProfile(
                np.asarray(npz["seam_cols"], np.float64),
                np.asarray(npz["seam_rows"], np.float64),
                int(npz["seam_count"]),
            )
    return ref


def _pool_labels(path: Path, stored: np.ndarray, pool_features: np.ndarray | None) -> np.ndarray:
    """A reference file's labels of its pool features, checked: one integer per feature row."""
    rows = 0 if pool_features is None else len(pool_features)
    if stored.dtype.kind not in "iu" or stored.shape != (rows,):
        raise BadReferenceFile(
            f"reference {path}: pool_labels ({stored.dtype} {stored.shape}) are not one integer label per each of "
            f"its {rows} pool features; {_RECOMPUTE}"
        )
    return stored.astype(np.int64)


def load_reference(
    path: str | os.PathLike[str],
    metrics: Collection[str],
    extractor: FeatureExtractor | None,
    device: torch.device,
    batch_size: int = 64,
    dinov2: nn.Module | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Reference:
    """The reference for ``metrics`` from an image npz, an ADM reference batch or the kit's reference file.

    What a file stores is used as it is (ADM's ``mu``/``sigma`` for FID, as the ADM evaluator does); what it
    lacks is extracted from its images (``arr_0``) when it has them, through the content-hash cache. What can be
    had neither way is left out; `compute_metrics` then reports the metric as None with a warning.
    Collective under a process group (extraction is spread over the ranks).
    """
    file = Path(path)
    ref = _read_reference_file(file)
    _check_networks(ref, extractor, dinov2)
    needs = {n for m in metrics for n in REFERENCE_NEEDS[m]}
    kinds = _kinds_to_extract(ref, needs, extractor, dinov2)
    if kinds:
        cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if use_cache else None
        extracted = _cached_features(file, sorted(kinds), extractor, device, batch_size, dinov2, cache)
        _complete_reference(ref, extracted, needs, str(getattr(dinov2, "name", "")))
    if (
        "pool_labels" in needs
        and ref.pool_labels is None
        and ref.layout != "stats"
        and ref.has("pool_features")
    ):
        ref.pool_labels = npz_labels(file, len(ref.pool_features))  # type: ignore[arg-type]
    return ref


def reference_image_size(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(height, width)`` of a reference's images, from its image array's header (an image npz, an ADM batch) or
    its seam profile (a `save_reference` file); None when the file does not tell. Reads no image."""
    keys = _npz_keys(Path(path))
    if "arr_0" in keys:
        return npz_images(path).size
    if "seam_cols" in keys and "seam_rows" in keys:
        return npz_image_shape(path, "seam_rows")[0] + 1, npz_image_shape(path, "seam_cols")[0] + 1
    return None


def _read_reference_file(file: Path) -> Reference:
    """What the file stores (statistics and features as they are, images only noted and their header checked)."""
    if not file.is_file():
        raise FileNotFoundError(
            f"reference {file} not found; pass an image npz (arr_0: uint8 NHWC), an ADM reference batch, or "
            f"a reference file from `python -m dip_lightning fid-stats --shards '<real shards>' --out {file}`"
        )
    keys = _npz_keys(file)
    has_images = "arr_0" in keys
    image_size = npz_images(file).size if has_images else None
    if "mu" in keys and "sigma" in keys:
        ref = _read_stats_file(file, keys)
        ref.layout = "adm" if has_images else "stats"
        ref.image_size = image_size or (ref.seam.image_size if ref.seam is not None else None)
        return ref
    if has_images:
        return Reference(str(file), layout="images", image_size=image_size)
    raise BadReferenceFile(
        f"{file} is not a reference: it has neither images (arr_0) nor statistics (mu, sigma); keys: {keys}"
    )


def check_reference_file(path: str | os.PathLike[str]) -> None:
    """Raise what :func:`load_reference` would about the file itself (missing, no npz, no images nor statistics,
    statistics of inconsistent shape or not finite), cheaply: call it before hours of sampling that end in an
    evaluation against it."""
    _read_reference_file(Path(path))


def _check_networks(ref: Reference, extractor: FeatureExtractor | None, dinov2: nn.Module | None) -> None:
    """Statistics made with another feature network than the samples' are an error (an ADM batch, which records
    none, a warning: its TensorFlow Inception is what the kit's Inception ports)."""
    recorded = ref.extractor if ref.layout != "images" else ""
    if extractor is not None and recorded and recorded != extractor.name:
        raise BadReferenceFile(
            f"{ref.path} was computed with extractor {recorded!r} but the samples use {extractor.name!r}; "
            "recompute it with that extractor (fid-stats --extractor ...)"
        )
    if ref.layout == "adm" and not ref.extractor and extractor is not None:
        warnings.warn(
            f"{ref.path} records no extractor (an ADM reference batch): its mu/sigma come from the TensorFlow "
            f"Inception and are compared with {extractor.name} features of the samples",
            stacklevel=3,
        )
    dinov2_name = str(getattr(dinov2, "name", ""))
    recorded_dinov2 = ref.stats["dinov2"].extractor if "dinov2" in ref.stats else ""
    if dinov2 is not None and recorded_dinov2 not in ("", dinov2_name):
        raise BadReferenceFile(
            f"{ref.path}: FD-DINOv2 statistics were made with {recorded_dinov2!r}, the samples use "
            f"{dinov2_name!r}; recompute it with those DINOv2 weights (fid-stats --dinov2_weights ...)"
        )


def _kinds_to_extract(
    ref: Reference, needs: set[str], extractor: FeatureExtractor | None, dinov2: nn.Module | None
) -> set[str]:
    """The feature kinds to extract from the file's images: what ``needs`` asks for, the file lacks, and the
    networks given can compute."""
    if ref.layout == "stats":  # no images to extract from
        return set()
    kinds = set()
    for need in needs - {n for n in needs if ref.has(n)} - {"pool_labels"}:  # labels are read, not extracted
        kind = _FROM_IMAGES[need]
        if kind in INCEPTION_KINDS and (extractor is None or kind not in extractor.available()):
            continue
        if kind == "dinov2" and dinov2 is None:
            continue
        kinds.add(kind)
    return kinds


def _complete_reference(ref: Reference, extracted: FeatureSet, needs: set[str], dinov2_name: str) -> None:
    """Fill in what ``needs`` asks for and the file lacked from the features of its images."""
    if extracted.num_images < 2 and needs - {"seam"}:
        raise BadReferenceFile(
            f"reference {ref.path} holds {extracted.num_images} image(s); statistics and precision/recall need "
            "at least 2 (ADM's reference batches hold 10,000)"
        )
    ref.num_images = ref.num_images or extracted.num_images
    for kind in ("pool", "spatial", "dinov2"):
        if kind not in extracted.features:
            continue
        if kind == "pool" and "pool_features" in needs:
            ref.pool_features = extracted.features["pool"]
        if f"{kind}_stats" in needs and kind not in ref.stats:
            name = dinov2_name if kind == "dinov2" else extracted.extractor
            ref.stats[kind] = FIDStats.from_features(extracted.features[kind], name)
    if extracted.seam is not None:
        ref.seam = extracted.seam
    if ref.layout == "images":
        ref.extractor = extracted.extractor


def reference_from_features(features: FeatureSet, name: str = "", dinov2_name: str = "") -> Reference:
    """The `Reference` of an in-memory feature set (real images read from shards), as `save_reference` would
    store it and `load_reference` read it back."""
    ref = Reference(name, extractor=features.extractor, num_images=features.num_images, layout="images")
    for kind in ("pool", "spatial", "dinov2"):
        if kind in features.features:
            ref.stats[kind] = features.stats(kind)
            if kind == "dinov2":
                ref.stats[kind].extractor = dinov2_name
    if "pool" in features.features:
        ref.pool_features = features.features["pool"][:PR_REFERENCE_SIZE]
        if features.labels is not None:
            ref.pool_labels = features.labels[:PR_REFERENCE_SIZE]
    ref.seam = features.seam
    return ref


def save_reference(
    path: str | os.PathLike[str],
    features: FeatureSet,
    overwrite: bool = False,
    pr_size: int = PR_REFERENCE_SIZE,
    dinov2_name: str = "",
) -> None:
    """Write the kit's reference file (see the module docstring) atomically, refusing to replace a file by
    default: reference statistics are expensive (hours over ImageNet) and silently replacing them with a run
    over the wrong shards would make every later number wrong."""
    arrays: dict[str, np.ndarray] = {
        "num_samples": np.int64(features.num_images),
        "extractor": np.str_(features.extractor),
    }
    if "pool" in features.features:
        stats = features.stats("pool")
        arrays["mu"], arrays["sigma"] = stats.mu, stats.sigma
        arrays["pool_features"] = features.features["pool"][:pr_size].astype(np.float32)
        if features.labels is not None:
            arrays["pool_labels"] = features.labels[:pr_size].astype(np.int64)
    if "spatial" in features.features:
        stats = features.stats("spatial")
        arrays["mu_s"], arrays["sigma_s"] = stats.mu, stats.sigma
    if "dinov2" in features.features:
        stats = features.stats("dinov2")
        arrays["dinov2_mu"], arrays["dinov2_sigma"] = stats.mu, stats.sigma
        arrays["dinov2_extractor"] = np.str_(dinov2_name)
    if features.seam is not None:
        arrays["seam_cols"], arrays["seam_rows"] = features.seam.cols, features.seam.rows
        arrays["seam_count"] = np.int64(features.seam.num_images)
    with atomic_write(path, overwrite=overwrite) as f:  # a file object stops np.savez from adding ".npz"
        np.savez(f, **arrays)
