"""Patch-seam score: gradient energy across the patch grid's boundaries, relative to inside the patches.

DiP's Patch Detailer Head exists to remove the blocking a DiT on 16 x 16 patches leaves at patch edges
(paper §3.2). No standard metric sees that: a seam is a few pixels wide and Inception pools it away. This
score measures it directly.

For an image ``x`` (RGB in [0, 1]) and patch size ``p``, take the finite differences between neighbouring
pixels, horizontally ``x[:, :, j+1] - x[:, :, j]`` and vertically. A difference *crosses a boundary* when
``j + 1`` is a multiple of ``p`` (the two pixels lie in different patches), otherwise it lies inside a patch.
The seam ratio of a set of images is

    ratio = mean(d² over boundary-crossing differences) / mean(d² over inside differences),

pooled over all images, channels and both directions (a ratio of means, so a few flat images cannot blow it
up). Natural images have ratio ≈ 1 at any grid they were not made on; but resizing/cropping leave traces, so
the score divides by the reference's ratio:

    patch_seam = ratio(samples) / ratio(reference)

1.0 means no more energy at patch boundaries than real images have; 1.5 means 50 % more.

`SeamProfile` keeps the summed squared differences at each column and row position (``W - 1`` and ``H - 1``
numbers), so the ratio for any patch size comes from the same pass, profiles of several ranks add up, and a
reference file stores the profile instead of its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from dip_lightning.core.metrics.errors import MetricsError

__all__ = ["SeamProfile", "patch_seam_score", "seam_ratio"]


@dataclass
class SeamProfile:
    """Summed squared neighbour differences per column gap (``cols``, W - 1) and row gap (``rows``, H - 1)."""

    cols: np.ndarray
    rows: np.ndarray
    num_images: int = 0

    @classmethod
    def empty(cls, height: int, width: int) -> SeamProfile:
        return cls(np.zeros(width - 1), np.zeros(height - 1), 0)

    @classmethod
    def of_images(cls, images: Tensor) -> SeamProfile:
        """Profile of a uint8 ``(N, 3, H, W)`` batch."""
        x = images.double() / 255.0
        cols = (x[..., 1:] - x[..., :-1]).square().sum(dim=(0, 1, 2))
        rows = (x[..., 1:, :] - x[..., :-1, :]).square().sum(dim=(0, 1, 3))
        return cls(cols.cpu().numpy(), rows.cpu().numpy(), int(images.shape[0]))

    @property
    def image_size(self) -> tuple[int, int]:
        return len(self.rows) + 1, len(self.cols) + 1

    def __add__(self, other: SeamProfile) -> SeamProfile:
        if self.image_size != other.image_size:
            raise ValueError(f"seam profiles of {self.image_size} and {other.image_size} images cannot add")
        return SeamProfile(self.cols + other.cols, self.rows + other.rows, self.num_images + other.num_images)

    def update(self, images: Tensor) -> None:
        batch = SeamProfile.of_images(images)
        if self.num_images == 0 and self.image_size != batch.image_size:
            self.cols, self.rows = batch.cols * 0, batch.rows * 0
        summed = self + batch
        self.cols, self.rows, self.num_images = summed.cols, summed.rows, summed.num_images


def _split(profile: np.ndarray, patch_size: int) -> tuple[float, int, float, int]:
    gaps = np.arange(1, len(profile) + 1)  # gap j sits between pixel j-1 and pixel j
    boundary = gaps % patch_size == 0
    return (
        float(profile[boundary].sum()),
        int(boundary.sum()),
        float(profile[~boundary].sum()),
        int((~boundary).sum()),
    )


def seam_ratio(profile: SeamProfile, patch_size: int) -> float:
    """Mean squared difference across patch boundaries over the mean inside patches (see module docstring)."""
    if patch_size < 2:
        raise MetricsError(f"the patch size must be >= 2, got {patch_size}")
    b_c, nb_c, i_c, ni_c = _split(profile.cols, patch_size)
    b_r, nb_r, i_r, ni_r = _split(profile.rows, patch_size)
    if nb_c + nb_r == 0:
        height, width = profile.image_size
        raise MetricsError(
            f"{height}x{width} images hold no boundary of a {patch_size}-pixel patch grid: pass the model's "
            "--patch_size"
        )
    inside = (i_c + i_r) / (ni_c + ni_r)
    if inside == 0:
        return float("inf") if b_c + b_r > 0 else 1.0
    return ((b_c + b_r) / (nb_c + nb_r)) / inside


def patch_seam_score(samples: SeamProfile, reference: SeamProfile, patch_size: int) -> float:
    """``seam_ratio(samples) / seam_ratio(reference)``: 1.0 = no seams beyond what real images have."""
    if samples.image_size != reference.image_size:
        raise MetricsError(
            f"samples are {samples.image_size[0]}x{samples.image_size[1]} but the reference images are "
            f"{reference.image_size[0]}x{reference.image_size[1]}; the patch grid must line up: use a reference "
            "of the samples' resolution"
        )
    return seam_ratio(samples, patch_size) / seam_ratio(reference, patch_size)
