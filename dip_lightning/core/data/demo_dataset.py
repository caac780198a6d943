"""The embedded demo dataset: ``python -m dip_lightning demo-data --out data/demo``.

Built offline from real photos that ship inside scikit-image (``skimage.data``; CC0 / public domain):
one class per photo, many random crops, written through the same code path as real data (an
ImageFolder of PNG crops -> :func:`dip_lightning.core.data.prepare.prepare_split` with the ADM crop). The
eight photos differ in colour and content (a portrait, a cat, a cup, a rocket, a galaxy field, a
stained tissue section, a retina, a motorbike), so a tiny model learns to tell the classes apart in
a few hundred CPU steps. Idempotent: a complete dataset with the same parameters returns at once.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dip_lightning.core.atomic import leftover_temp_files
from dip_lightning.core.errors import ConfigError, KitError
from dip_lightning.core.folder_lock import POLL_S, FolderLock

# Sorted, so that the position here is the class index the prepare tool assigns (sorted folder names).
DEMO_CLASSES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)
_DEMO_VERSION = 1
#: Name of the metrics reference files the demo writes beside the shards (``ref_val.npz``, ``ref_val-<net>.npz``):
#: statistics of these validation crops, so a rebuild with other crops removes them with the shards.
REFERENCE_PREFIX = "ref_val"
#: Crop side as a fraction of the photo's short side (the range random crops draw from).
DEFAULT_CROP_SCALE = (0.35, 0.9)


def load_photo(name: str):  # -> np.ndarray (H, W, 3) uint8
    import numpy as np
    from skimage import data as skdata

    img = getattr(skdata, name)()
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
        img = img[0]
    return np.ascontiguousarray(img[..., :3])


def _random_crops(
    photo, n: int, size: int, rng, side_range: tuple[float, float] = DEFAULT_CROP_SCALE
) -> list:
    """Random crops covering ``side_range`` (default 35-90%) of the short side, aspect 0.8-1.25, saved at 1-2x ``size``.

    The prepare step then applies the ADM crop, so the demo exercises the same resize path as ImageNet.
    """
    from PIL import Image

    img = Image.fromarray(photo)
    w, h = img.size
    short = min(w, h)
    crops = []
    for _ in range(n):
        side = short * rng.uniform(*side_range)
        aspect = rng.uniform(0.8, 1.25)
        cw, ch = min(w, side * aspect), min(h, side / aspect)
        x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = img.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))
        scale = size * rng.uniform(1.0, 2.0) / min(crop.size)
        out = (max(size, round(crop.size[0] * scale)), max(size, round(crop.size[1] * scale)))
        crops.append(crop.resize(out, resample=Image.Resampling.BICUBIC))
    return crops


def _params(
    size: int, train_per_class: int, val_per_class: int, seed: int, scale: tuple[float, float]
) -> dict:
    params = {
        "version": _DEMO_VERSION,
        "classes": list(DEMO_CLASSES),
        "size": size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
    }
    # Only a non-default range is recorded: datasets built before the option keep matching their note.
    if tuple(scale) != DEFAULT_CROP_SCALE:
        params["crop_scale"] = [float(scale[0]), float(scale[1])]
    return params


def _result(out: Path, train_manifest: dict, val_manifest: dict) -> dict:
    return {
        "root": str(out),
        "train_shards": str(out / train_manifest["pattern"]),
        "val_shards": str(out / val_manifest["pattern"]),
        "classes_file": str(out / "classes.txt"),
        "class_names": list(DEMO_CLASSES),
        "num_classes": len(DEMO_CLASSES),
        "image_size": train_manifest["image_size"],
        "num_train": train_manifest["num_samples"],
        "num_val": val_manifest["num_samples"],
        "train_manifest": str(out / "train-manifest.json"),
        "val_manifest": str(out / "val-manifest.json"),
        "replaced": {},
        "repaired": False,
    }


def _complete(out: Path, params: dict) -> dict | None:
    try:
        manifests = [json.loads((out / f"{s}-manifest.json").read_text()) for s in ("train", "val")]
    except (OSError, ValueError):
        return None
    for m in manifests:
        if m.get("source", {}).get("note") != json.dumps(params, sort_keys=True):
            return None
        for shard in m["shards"]:
            path = out / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                return None
    return _result(out, *manifests)


def describe_replaced(info: dict) -> str | None:
    """One line saying which earlier demo build :func:`build_demo_dataset` replaced, and why; None if none."""
    if info.get("repaired"):
        return (
            f"{info['root']} held an incomplete or damaged demo build (a shard missing or cut short): rebuilt"
        )
    if not info.get("replaced"):
        return None
    changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in info["replaced"].items())
    return (
        f"{info['root']} held the demo data built with other settings ({changes}): rebuilt (its shards and metrics "
        "references replaced)"
    )


def _changed_settings(out: Path, params: dict) -> dict[str, tuple[Any, Any]]:
    """``{setting: (earlier, now)}`` where an earlier demo build in ``out`` differs from ``params``; {} if none."""
    try:
        earlier = json.loads(json.loads((out / "train-manifest.json").read_text())["source"]["note"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(earlier, dict):
        return {}
    default = {"crop_scale": list(DEFAULT_CROP_SCALE)}  # recorded only when not the default
    earlier, now = {**default, **earlier}, {**default, **params}
    return {
        k: (earlier.get(k), now.get(k))
        for k in sorted(earlier.keys() | now.keys())
        if earlier.get(k) != now.get(k)
    }


def _is_demo_manifest(path: Path) -> bool:
    try:
        note = json.loads(json.loads(path.read_text())["source"]["note"])
        return isinstance(note, dict) and "train_per_class" in note
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_demo_files(out: Path) -> None:
    # Only what an earlier demo build wrote: never a whole folder the user may have pointed us at.
    for pattern in ("train-*.tar", "val-*.tar", "*-manifest.json", f"{REFERENCE_PREFIX}*.npz"):
        for path in [*out.glob(pattern), *leftover_temp_files(out, pattern)]:
            path.unlink()
    (out / "classes.txt").unlink(missing_ok=True)
    for name in (".train-progress", ".val-progress"):
        shutil.rmtree(out / name, ignore_errors=True)


def _check_options(size: int, crop_scale: tuple[float, float]) -> None:
    if size < 8:
        raise ConfigError(f"size must be >= 8, got {size}")
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ConfigError(
            f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {tuple(crop_scale)}"
        )


class DemoDataInUse(KitError, RuntimeError):
    """The demo data folder would have to be rebuilt while another process reads it."""


#: The lock file that readers of a demo data folder share and its builder takes alone (``core.folder_lock``).
LOCK_NAME = ".demo-lock"
#: Seconds a process that needs a rebuild keeps trying to have the folder alone before it refuses.
REBUILD_PATIENCE_S = 2.0


@contextlib.contextmanager
def demo_dataset(
    out: str | Path = "data/demo",
    size: int = 32,
    train_per_class: int = 96,
    val_per_class: int = 16,
    seed: int = 0,
    workers: int = 1,
    progress: bool = False,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[dict]:
    """Build (or find) the demo dataset and hold it for reading until the ``with`` block ends.

    Any number of processes read one data folder together; a process that needs it built with other settings
    rebuilds it only when no other process holds it, and otherwise gets :class:`DemoDataInUse` (the shards
    another ``demo`` is training on are never replaced under it). One that finds a rebuild in progress waits for
    it (``on_wait`` is told once). ``crop_scale``: the range of crop sides as fractions of each photo's short side.

    Yields a dict with ``root``, ``train_shards``, ``val_shards`` (brace patterns for the YAML config),
    ``classes_file``, ``class_names``, ``num_classes`` (8), ``image_size``, ``num_train``, ``num_val``,
    ``train_manifest``, ``val_manifest``, ``replaced``: ``{setting: (earlier, now)}`` of an earlier demo build in
    ``out`` made with other settings, which this call replaced (its shards and metrics references; {} if none),
    ``repaired``: whether it rebuilt an incomplete or damaged build of these settings.
    """
    _check_options(size, crop_scale)
    out = Path(out)
    params = _params(size, train_per_class, val_per_class, seed, crop_scale)
    for split in ("train", "val"):  # checked before the lock file is made in a folder that is not ours
        manifest = out / f"{split}-manifest.json"
        if manifest.exists() and not _is_demo_manifest(manifest):
            raise FileExistsError(f"{out} holds another dataset; choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: the demo data needs a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    replaced: dict[str, tuple[Any, Any]] = {}
    repaired = False
    patience = time.monotonic() + REBUILD_PATIENCE_S
    with FolderLock(out, LOCK_NAME) as lock:
        while True:
            # Alone (nobody else reads or writes it): check, and build what is missing.
            if lock.take_alone() and _complete(out, params) is None:
                replaced = replaced or _changed_settings(out, params)
                repaired = repaired or (not replaced and (out / "train-manifest.json").exists())
                _build(out, params, size, train_per_class, val_per_class, seed, workers, progress, crop_scale)
            lock.share(on_wait)  # held for reading from here (after any builder has finished)
            if (done := _complete(out, params)) is not None:
                break
            # A reader holds it for minutes, a process that checks it for moments.
            if time.monotonic() > patience:
                changed = _changed_settings(out, params)
                settings = (
                    ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()) or "incomplete"
                )
                raise DemoDataInUse(
                    f"{out} holds demo data built with other settings ({settings}), and another process is reading "
                    "it (a demo still training?): it is not rebuilt under that process. Wait for it to finish, "
                    "or give this run a folder of its own (demo --data_dir, demo-data --out)"
                )
            time.sleep(POLL_S * (1 + random.random()))  # apart from another process that also checks
        yield {**done, "replaced": replaced, "repaired": repaired}


def build_demo_dataset(out: str | Path = "data/demo", **settings: Any) -> dict:
    """Build (or find) the demo dataset, without holding it afterwards; ``settings``: those of :func:`demo_dataset`."""
    with demo_dataset(out, **settings) as info:
        return info


def _build(
    out: Path,
    params: dict,
    size: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    workers: int,
    progress: bool,
    crop_scale: tuple[float, float],
) -> None:
    """Write the dataset into ``out`` (held alone), replacing an earlier or partial demo build."""
    import numpy as np

    from dip_lightning.core.data.prepare import prepare_split

    _remove_demo_files(out)
    note = json.dumps(params, sort_keys=True)
    rng = np.random.default_rng(seed)
    photos = {name: load_photo(name) for name in DEMO_CLASSES}  # decoded once for both splits
    with tempfile.TemporaryDirectory(prefix="dip-demo-") as tmp:
        staging = Path(tmp)
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            for name in DEMO_CLASSES:
                folder = staging / split / name
                folder.mkdir(parents=True)
                for i, crop in enumerate(_random_crops(photos[name], per_class, size, rng, crop_scale)):
                    crop.save(folder / f"{name}_{split}_{i:04d}.png", compress_level=1)
        manifests = {}
        for split, shard_size in (("train", 256), ("val", 64)):
            manifests[split] = prepare_split(
                staging / split,
                out,
                split=split,
                image_size=size,
                format="png",
                shard_size=shard_size,
                seed=seed,
                workers=workers,
                progress=progress,
                source_note=note,
            )
    # The staging folder is gone; record where the pixels came from instead of a temp path.
    for split, manifest in manifests.items():
        manifest["source"]["path"] = "skimage.data (scikit-image bundled photos)"
        path = out / f"{split}-manifest.json"
        path.write_text(json.dumps(manifest, indent=1))
