"""The metrics engine: the ADM evaluator's suite (FID, sFID, IS, precision, recall), FD-DINOv2, the
patch-seam score and class agreement, used by the ``evaluate`` command and by the in-training `MetricsCallback` alike.

``compute_metrics(samples, reference)`` is the one entry point for image arrays; `metrics_from_features`
is the step after feature extraction, which the callback calls on the features it gathered from all ranks.
Definitions, and what differs from the ADM evaluator, are in docs/design.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dip_lightning.core.distributed import is_distributed, rank_and_world
from dip_lightning.core.metrics.class_agreement import class_agreement
from dip_lightning.core.metrics.errors import MetricsError
from dip_lightning.core.metrics.features import (
    DINOV2_WEIGHTS_ENV,
    DINOv2Features,
    FeatureExtractor,
    FIDHelperInception,
)
from dip_lightning.core.metrics.frechet import FIDStats, frechet_distance
from dip_lightning.core.metrics.inception_score import inception_score
from dip_lightning.core.metrics.patch_seam import patch_seam_score
from dip_lightning.core.metrics.precision_recall import ADM_NEIGHBOURHOOD, precision_recall
from dip_lightning.core.metrics.reference import (
    REFERENCE_NEEDS,
    FeatureSet,
    MetricUnavailableWarning,
    Reference,
    extract_feature_set,
    gather_feature_set,
    load_reference,
    warn_unavailable,
)

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_GOALS",
    "METRIC_NAMES",
    "MetricEngine",
    "MetricUnavailableWarning",
    "check_metric_names",
    "compute_metrics",
    "metrics_from_features",
    "sample_kinds",
]

#: Every metric the engine knows, in the order tables and CSV columns list them.
METRIC_NAMES: tuple[str, ...] = (
    "fid",
    "sfid",
    "inception_score",
    "precision",
    "recall",
    "patch_seam",
    "fd_dinov2",
    "class_agreement",
)
#: Which value of a metric is best: "min", "max", or a number (the value nearest to it; 1.0 = seams like the
#: reference's, either side is worse).
METRIC_GOALS: dict[str, str | float] = {
    "fid": "min",
    "sfid": "min",
    "inception_score": "max",
    "precision": "max",
    "recall": "max",
    "patch_seam": 1.0,
    "fd_dinov2": "min",
    "class_agreement": "max",
}
#: What ``compute_metrics(metrics=None)`` computes: all of them (those that cannot run here give None).
DEFAULT_METRICS = METRIC_NAMES

#: Per-image features each metric needs from the samples.
_SAMPLE_KINDS: dict[str, tuple[str, ...]] = {
    "fid": ("pool",),
    "sfid": ("spatial",),
    "inception_score": ("probs",),
    "precision": ("pool",),
    "recall": ("pool",),
    "patch_seam": ("seam",),
    "fd_dinov2": ("dinov2",),
    "class_agreement": ("pool",),
}


def check_metric_names(metrics: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(metrics))
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise MetricsError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    return names


def sample_kinds(metrics: Iterable[str]) -> set[str]:
    """Feature kinds the samples need for ``metrics``."""
    return {k for m in metrics for k in _SAMPLE_KINDS[m]}


@dataclass
class MetricEngine:
    """The networks and the reference of one evaluation setup, loaded once and reused (callback, sweep).

    Build it with `MetricEngine.create`; `usable` says which metrics can run (the others give None, warned once
    at creation).
    """

    metrics: list[str]
    extractor: FeatureExtractor | None
    dinov2: nn.Module | None
    reference: Reference
    patch_size: int | None
    device: torch.device
    batch_size: int = 64
    unusable: dict[str, str] | None = None

    @classmethod
    def create(
        cls,
        reference: str | os.PathLike[str] | Reference,
        metrics: Sequence[str] | None = None,
        patch_size: int | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        extractor: FeatureExtractor | None = None,
        dinov2: nn.Module | None = None,
        dinov2_weights: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> MetricEngine:
        names = check_metric_names(metrics if metrics is not None else DEFAULT_METRICS)
        dev = torch.device(device) if device is not None else _default_device()
        unusable: dict[str, str] = {}
        inception_metrics = [m for m in names if m not in ("patch_seam", "fd_dinov2")]
        if extractor is None and inception_metrics:
            extractor = FIDHelperInception()
        if extractor is not None:
            extractor = extractor.to(dev)
            unusable |= _beyond_extractor(extractor, inception_metrics)
        if "fd_dinov2" in names and dinov2 is None:
            path = dinov2_weights or os.environ.get(DINOV2_WEIGHTS_ENV)
            if path:
                dinov2 = DINOv2Features(path)
            else:
                unusable["fd_dinov2"] = (
                    f"no DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth); pass --dinov2_weights or set "
                    f"${DINOV2_WEIGHTS_ENV}"
                )
        if dinov2 is not None:
            dinov2 = dinov2.to(dev)
        if "patch_seam" in names and patch_size is None:
            unusable["patch_seam"] = "no patch size (--patch_size, or a checkpoint that records it)"
        usable = [m for m in names if m not in unusable]
        ref = (
            reference
            if isinstance(reference, Reference)
            else load_reference(
                reference,
                usable,
                extractor,
                dev,
                batch_size,
                dinov2,
                cache_dir=cache_dir,
                use_cache=use_cache,
            )
        )
        unusable |= _beyond_reference(ref, usable)
        for m, why in unusable.items():
            warn_unavailable(m, why)
        return cls(names, extractor, dinov2, ref, patch_size, dev, batch_size, unusable)

    @property
    def usable(self) -> list[str]:
        return [m for m in self.metrics if m not in (self.unusable or {})]

    def sample_kinds(self) -> set[str]:
        return sample_kinds(self.usable)

    def features(self, batches: Iterable[Tensor]) -> FeatureSet:
        """This rank's sample features for the usable metrics (not gathered)."""
        return extract_feature_set(batches, self.sample_kinds(), self.extractor, self.device, self.dinov2)

    def evaluate(
        self, samples: FeatureSet, unavailable: dict[str, str] | None = None
    ) -> dict[str, float | None]:
        """Metrics of already gathered sample features; ``unavailable`` (when given) gets why each None is None,
        the reasons found at creation (`unusable`) included."""
        if unavailable is not None:
            unavailable.update(self.unusable or {})
        return metrics_from_features(
            samples,
            self.reference,
            self.usable,
            self.patch_size,
            self.device,
            all_metrics=self.metrics,
            unavailable=unavailable,
        )


def _beyond_extractor(extractor: FeatureExtractor, metrics: Sequence[str]) -> dict[str, str]:
    """``{metric: why}`` for the metrics this Inception network cannot feed."""
    why = {
        "probs": f"the Inception network {extractor.name} has no classifier layer (softmax/logits); "
        "use --extractor torchscript with inception-2015-12-05.pt",
        "spatial": f"the Inception network {extractor.name} does not expose mixed_6/conv",
    }
    return {
        m: why[sorted(missing)[0]] for m in metrics if (missing := sample_kinds([m]) - extractor.available())
    }


def _beyond_reference(reference: Reference, metrics: Sequence[str]) -> dict[str, str]:
    """``{metric: why}`` for the metrics the reference holds too little for."""
    unusable = {}
    for m in metrics:
        missing = [n for n in REFERENCE_NEEDS[m] if not reference.has(n)]
        if missing == ["pool_labels"]:
            unusable[m] = (
                f"the reference {reference.path} holds no class labels: make it with `python -m dip_lightning "
                "fid-stats --shards ...` (shards carry labels), or pass an image npz with labels in arr_1"
            )
        elif missing:
            unusable[m] = (
                f"the reference {reference.path} holds no {', '.join(missing)}: recompute it with "
                "`python -m dip_lightning fid-stats`, or pass an image npz"
            )
    return unusable


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: The Fréchet distances and the features each compares.
_FRECHET_KINDS = {"fid": "pool", "sfid": "spatial", "fd_dinov2": "dinov2"}


def metrics_from_features(
    samples: FeatureSet,
    reference: Reference,
    metrics: Sequence[str],
    patch_size: int | None = None,
    device: str | torch.device | None = None,
    all_metrics: Sequence[str] | None = None,
    unavailable: dict[str, str] | None = None,
) -> dict[str, float | None]:
    """Every metric in ``metrics`` from sample features and a reference; keys of ``all_metrics`` that are not
    in ``metrics`` are None, and so is a metric these inputs cannot give (too few samples) or that comes out NaN
    or infinite: each such one with a `MetricUnavailableWarning` and, when ``unavailable`` is given, its reason
    there. A result is never NaN, so every record of it is valid JSON."""
    out: dict[str, float | None] = dict.fromkeys(all_metrics if all_metrics is not None else metrics)
    values, reasons = _scores(samples, reference, metrics, patch_size, device)
    for metric, value in values.items():
        if math.isfinite(value):
            out[metric] = value
        else:
            reasons[metric] = (
                f"came out {value}: the sample or reference features hold NaN or infinite values"
            )
    for metric, why in reasons.items():
        warn_unavailable(metric, why)
    if unavailable is not None:
        unavailable.update(reasons)
    return out


def _scores(
    samples: FeatureSet,
    reference: Reference,
    metrics: Sequence[str],
    patch_size: int | None,
    device: str | torch.device | None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The values of the metrics these inputs give, and why each other one cannot be computed."""
    values: dict[str, float] = {}
    reasons: dict[str, str] = {}
    if samples.num_images == 0:
        return values, dict.fromkeys(metrics, "no samples")
    for metric in metrics:
        if metric in _FRECHET_KINDS:
            if samples.num_images < 2:
                reasons[metric] = f"needs at least 2 samples (a covariance), got {samples.num_images}"
            else:
                values[metric] = _frechet(samples, reference, _FRECHET_KINDS[metric])
        elif metric == "inception_score":
            values[metric] = inception_score(samples.features["probs"])
        elif metric == "patch_seam":
            assert samples.seam is not None and reference.seam is not None and patch_size is not None
            values[metric] = patch_seam_score(samples.seam, reference.seam, patch_size)
        elif metric == "class_agreement":
            if samples.labels is None:
                reasons[metric] = "the samples carry no class labels (an npz without arr_1)"
            else:
                assert reference.pool_features is not None and reference.pool_labels is not None
                values[metric] = class_agreement(
                    reference.pool_features,
                    reference.pool_labels,
                    samples.features["pool"],
                    samples.labels,
                    device=device,
                )
    wanted = [m for m in ("precision", "recall") if m in metrics]
    if wanted:  # computed together
        _precision_recall(samples, reference, wanted, device, values, reasons)
    return values, reasons


def _precision_recall(
    samples: FeatureSet,
    reference: Reference,
    wanted: Sequence[str],
    device: str | torch.device | None,
    values: dict[str, float],
    reasons: dict[str, str],
) -> None:
    """Precision and/or recall (``wanted``) into ``values``, or why not into ``reasons``."""
    assert reference.pool_features is not None
    counts = (samples.num_images, len(reference.pool_features))
    if min(counts) <= ADM_NEIGHBOURHOOD:
        why = (
            f"needs more than {ADM_NEIGHBOURHOOD} samples and reference images (k={ADM_NEIGHBOURHOOD} "
            f"nearest neighbours), got {counts[0]} and {counts[1]}"
        )
        reasons |= dict.fromkeys(wanted, why)
    else:
        pair = precision_recall(reference.pool_features, samples.features["pool"], device=device)
        values |= {m: v for m, v in zip(("precision", "recall"), pair) if m in wanted}


def _frechet(samples: FeatureSet, reference: Reference, kind: str) -> float:
    """The Frechet distance of the samples' ``kind`` features to the reference's statistics of that kind."""
    stats = FIDStats.from_features(samples.features[kind])
    ref = reference.stats[kind]
    if stats.mu.shape != ref.mu.shape:
        raise MetricsError(
            f"the reference's {kind} statistics have {ref.mu.shape[0]} features, the samples' "
            f"{stats.mu.shape[0]}: they come from different networks"
        )
    if not all(np.isfinite(a).all() for a in (stats.mu, stats.sigma, ref.mu, ref.sigma)):
        return math.nan  # reported as unavailable; the eigendecompositions would fail on it
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)


def compute_metrics(
    samples: np.ndarray,
    reference: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    patch_size: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    *,
    extractor: FeatureExtractor | None = None,
    dinov2_weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    unavailable: dict[str, str] | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Metrics of uint8 samples ``(N, H, W, 3)`` (class ``labels``, where known: class agreement) against
    ``reference`` (image npz, ADM reference batch or the kit's reference file).

    Returns ``{metric: value}`` for the metrics asked for (default: all of `METRIC_NAMES`); None where a
    metric cannot be computed here (no classifier layer for IS, no DINOv2 weights, no patch size, an old
    reference, too few samples, a non-finite value), each with a one-line `MetricUnavailableWarning` and its reason
    in ``unavailable`` when given. Reference features are cached by the file's
    content hash (``cache_dir``, default ``$DIP_METRICS_CACHE`` or ``~/.cache/dip_lightning/metrics``). Under a
    process group (torchrun/srun) every rank passes the same ``samples``, extracts a contiguous slice, and all
    ranks get the same result.
    """
    arr = np.asarray(samples)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise MetricsError(f"samples must be uint8 (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    if labels is not None and np.shape(labels) != (len(arr),):
        raise MetricsError(
            f"{len(arr)} samples need {len(arr)} labels, got an array of shape {np.shape(labels)}"
        )
    engine = MetricEngine.create(
        reference,
        metrics,
        patch_size,
        device,
        batch_size,
        extractor=extractor,
        dinov2_weights=dinov2_weights,
        cache_dir=cache_dir,
    )
    rank, world = rank_and_world() if is_distributed() else (0, 1)
    bounds = np.linspace(0, len(arr), world + 1).round().astype(int)
    start, stop = int(bounds[rank]), int(bounds[rank + 1])
    mine = arr[start:stop]
    batches: Iterable[Tensor | tuple[Tensor, np.ndarray]] = (
        torch.from_numpy(np.ascontiguousarray(mine[i : i + batch_size])).permute(0, 3, 1, 2).contiguous()
        for i in range(0, len(mine), batch_size)
    )
    if labels is not None:
        mine_labels = np.asarray(labels, dtype=np.int64)[start:stop]
        batches = zip(batches, (mine_labels[i : i + batch_size] for i in range(0, len(mine), batch_size)))
    return engine.evaluate(gather_feature_set(engine.features(batches)), unavailable)
