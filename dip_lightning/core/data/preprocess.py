"""Image preprocessing shared by the shard tool, the DataModule and the FID tools.

* :func:`center_crop_arr` is the ADM crop (guided-diffusion ``image_datasets.py``) used by ADM, DiT,
  SiT, REPA, JiT and DiP, and by the ``VIRTUAL_imagenet256_labeled.npz`` FID reference statistics:
  halve with a box filter while the short side is at least twice the target, resize the short side to
  the target with bicubic resampling, take the integer centre crop.
* :func:`decode_image` turns encoded bytes (any format Pillow reads, any mode: CMYK, greyscale, palette,
  RGBA) into an ``(H, W, 3)`` uint8 RGB array; images that are not already ``size x size`` get the ADM
  crop, so shards holding original bytes (``orig``) or other tools' full-size JPEGs are cropped at load.
* :class:`ImageLimits` bounds what one image may cost, checked from its header before any pixel is decoded: a
  100 KB PNG can declare 30000 x 30000 pixels (gigabytes once decoded). Pillow's own bound is a process-wide
  global (``Image.MAX_IMAGE_PIXELS``) that the kit leaves alone; the kit's limits are arguments of each call.

The uint8 <-> ``[-1, 1]`` conversion of loaded batches is :mod:`dip_lightning.core.images`; it runs batched in the
main process (or on the device): done per image in the loader workers it eats into the per-core decode budget.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode

from dip_lightning.core.errors import ConfigError, KitError

#: Default bound of one image's pixels (width x height): the largest ImageNet train image has about 32 M pixels.
DEFAULT_MAX_PIXELS = 50_000_000
#: Default bound of one image's bytes, encoded (the file) and decoded (pixels x bytes per pixel of its mode).
DEFAULT_MAX_BYTES = 256 * 2**20

PREPROCESS_MODES = ("adm", "none")
STORAGE_FORMATS = ("png", "jpg", "orig")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop of an RGB PIL image to ``(image_size, image_size, 3)`` uint8."""
    img = pil_image
    # Box-halving first keeps the bicubic step from aliasing on large inputs (and matches ADM bit for bit).
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(img.size)
    new_size = (round(img.size[0] * scale), round(img.size[1] * scale))
    if new_size != img.size:
        img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image: Image.Image, image_size: int, offset: float) -> np.ndarray:
    """The released code's ``random_crop`` (torchvision ``Resize(size)`` then ``RandomCrop(size)`` on a PIL image)
    with the crop position given: the shorter side is resized to ``image_size`` (PIL bilinear, as torchvision does
    for PIL images; the longer side becomes ``int(image_size * long / short)``), then a window of
    ``image_size`` is cut at ``floor(offset * (long - image_size + 1))`` along the longer side (``offset`` in
    [0, 1): the draw, made by the caller from a hash so that it is reproducible). The flip is the caller's too."""
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must lie in [0, 1), got {offset}")
    w, h = pil_image.size
    short, long = min(w, h), max(w, h)
    new_long = int(image_size * long / short)
    new_size = (image_size, new_long) if w <= h else (new_long, image_size)
    img = pil_image if new_size == (w, h) else pil_image.resize(new_size, resample=Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    start = int(offset * (new_long - image_size + 1))
    if w <= h:
        return arr[start : start + image_size, :image_size]
    return arr[:image_size, start : start + image_size]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (ImageNet has CMYK and greyscale JPEGs)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        # Pillow warns when a palette image with transparency goes straight to RGB.
        img = img.convert("RGBA")
    return img.convert("RGB")


class ImageTooLarge(KitError, ValueError):
    """An image larger than the :class:`ImageLimits` allow; it was not decoded."""


def _bytes_per_pixel(mode: str) -> int:
    try:
        descriptor = ImageMode.getmode(mode)
    except KeyError:
        return 4  # the widest of Pillow's modes
    return len(descriptor.bands) * np.dtype(descriptor.typestr).itemsize


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost, checked before it is decoded (see the module docstring).

    The defaults pass every ImageNet image; raise them for larger genuine images (``prepare --max_pixels``,
    ``ShardDataModule(max_image_pixels=...)``). Pillow refuses above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (179 M
    pixels) whatever these say.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height
    max_bytes: int = (
        DEFAULT_MAX_BYTES  # encoded size, and decoded size (pixels x bytes per pixel of the mode)
    )

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")

    def check_encoded(self, nbytes: int) -> None:
        """Refuse an encoded image (a file, a shard member) of more than ``max_bytes`` before reading it."""
        if nbytes > self.max_bytes:
            raise ImageTooLarge(
                f"{nbytes} bytes, above the limit of {self.max_bytes} bytes per image (max_bytes); skipped unread"
            )

    def check_decoded(self, width: int, height: int, bytes_per_pixel: int, what: str = "image") -> None:
        """Refuse an image whose header declares more than ``max_pixels`` pixels or ``max_bytes`` decoded bytes."""
        pixels = int(width) * int(height)
        nbytes = pixels * int(bytes_per_pixel)
        if pixels > self.max_pixels or nbytes > self.max_bytes:
            raise ImageTooLarge(
                f"{what} of {width}x{height} = {pixels} pixels ({nbytes} bytes decoded) exceeds the limit of "
                f"{self.max_pixels} pixels / {self.max_bytes} bytes per image (max_pixels / max_bytes; raise "
                "them only for genuine images); not decoded"
            )


DEFAULT_LIMITS = ImageLimits()


def open_checked(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """``data`` opened by Pillow (header read, pixels not yet decoded) once its size passed ``limits``."""
    limits.check_encoded(len(data))
    with warnings.catch_warnings():
        # Pillow's own bound warns from 89 M pixels: the kit's limits decide, right after this.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(
                f"image above the limit of {limits.max_pixels} pixels per image (Pillow: {exc}); not decoded"
            ) from None
    limits.check_decoded(
        img.size[0], img.size[1], _bytes_per_pixel(img.mode), f"{img.format} {img.mode} image"
    )
    return img


def open_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Fully decode ``data`` (raises on truncated or unreadable input, :class:`ImageTooLarge` beyond ``limits``
    before decoding) and return an RGB image."""
    img = open_checked(data, limits)
    img.load()  # decode now: a truncated file must fail here, not later
    return to_rgb(img)


def decode_image(
    data: bytes,
    image_size: int | None = None,
    crop_offset: float | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Decode to ``(H, W, 3)`` uint8; ADM-crop to ``image_size`` unless the image already has that size, or with
    ``crop_offset`` the released random crop (:func:`random_crop_arr`; a no-op on an image of that size). Images
    beyond ``limits`` raise :class:`ImageTooLarge` before they are decoded."""
    img = open_image(data, limits)
    if crop_offset is not None and image_size is not None:
        return random_crop_arr(img, image_size, crop_offset)
    if image_size is None or img.size == (image_size, image_size):
        return np.asarray(img)
    return center_crop_arr(img, image_size)


def preprocess(img: Image.Image, image_size: int, mode: str = "adm") -> Image.Image:
    """Apply a named preprocessing to an RGB image (``adm``: ADM centre crop; ``none``: unchanged)."""
    if mode == "adm":
        return Image.fromarray(center_crop_arr(to_rgb(img), image_size))
    if mode == "none":
        return to_rgb(img)
    raise ConfigError(f"unknown preprocessing {mode!r}; choose one of {PREPROCESS_MODES}")


def encode_image(img: Image.Image, fmt: str, quality: int = 95, png_level: int = 1) -> tuple[str, bytes]:
    """Encode an RGB image as ``png`` or ``jpg``; returns ``(extension, bytes)``.

    PNG compression level 1 writes several times faster than Pillow's default 6 for slightly larger
    files and decodes as fast (BENCHMARKS.md), which matters for a 1.28M-image job.
    """
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=png_level)
        return "png", buf.getvalue()
    if fmt == "jpg":
        # Pillow's default 4:2:0 chroma subsampling: 4:4:4 decodes several times slower, which would miss the
        # per-core decode target of an ImageNet job (BENCHMARKS.md).
        img.save(buf, format="JPEG", quality=quality)
        return "jpg", buf.getvalue()
    raise ConfigError(f"unknown storage format {fmt!r}; choose one of {STORAGE_FORMATS}")
