"""Why a metric cannot be computed from the inputs it was given: each message names the file or the setting and
what to do. Commands print them as one ``error:`` line (:mod:`dip_lightning.core.errors`). The image files' and the
reference files' own errors derive from :class:`MetricsError`: ``BadImageArray`` (sources.py) and
``BadReferenceFile`` (reference.py)."""

from __future__ import annotations

from dip_lightning.core.errors import KitError

__all__ = ["MetricsError"]


class MetricsError(KitError, ValueError):
    """Metrics asked of inputs that cannot give them: an unknown metric or extractor, features of different
    networks, too few images, images of another size than the reference's, an unusable image or reference file."""
