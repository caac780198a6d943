"""Why a metric cannot be computed from the inputs it was given: each message names the file or the setting and
what to do. Commands print them as one ``error:`` line (:mod:`dip_lightning.core.errors`)."""

from __future__ import annotations

from dip_lightning.core.errors import KitError

__all__ = ["ImageFileError", "MetricsError", "ReferenceFileError"]


class MetricsError(KitError, ValueError):
    """Metrics asked of inputs that cannot give them: an unknown metric or extractor, features of different
    networks, too few images, images of another size than the reference's."""


class ImageFileError(MetricsError):
    """An image npz (samples, or a reference's images) that cannot be read as uint8 images: not a zip, no
    ``arr_0``, another dtype or shape, truncated, or empty."""


class ReferenceFileError(MetricsError):
    """A reference file that cannot serve: neither images nor statistics, statistics of inconsistent shape or
    holding NaN/inf, made with another feature network than the samples'."""
