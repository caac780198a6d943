"""Older import path of the FID pieces, which now live in `dip_lightning.metrics` (one engine for every metric).

Kept so that YAML configs (``class_path: dip_lightning.fid.PixelProjection``) and scripts written against it keep
working; nothing is implemented here. New code imports from `dip_lightning.metrics` and its modules.
"""

from __future__ import annotations

from dip_lightning.evaluate import main_fid, main_fid_stats
from dip_lightning.metrics.features import (
    EDM_INCEPTION_FILE,
    FID_HELPER_FILE,
    INCEPTION_SIZE,
    FeatureExtractor,
    FIDHelperInception,
    PixelProjection,
    TorchmetricsInception,
    TorchScriptInception,
    make_extractor,
    resize_bilinear_tf1,
)
from dip_lightning.metrics.frechet import FIDStats, StatsAccumulator, frechet_distance
from dip_lightning.metrics.inception_score import inception_score
from dip_lightning.metrics.sources import iter_npz_images, iter_shard_images, npz_image_count

__all__ = [
    "EDM_INCEPTION_FILE",
    "FID_HELPER_FILE",
    "INCEPTION_SIZE",
    "FIDStats",
    "FeatureExtractor",
    "FIDHelperInception",
    "TorchScriptInception",
    "TorchmetricsInception",
    "PixelProjection",
    "StatsAccumulator",
    "resize_bilinear_tf1",
    "frechet_distance",
    "inception_score",
    "iter_npz_images",
    "npz_image_count",
    "iter_shard_images",
    "make_extractor",
    "main_fid_stats",
    "main_fid",
]
