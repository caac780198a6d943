"""Turn an image folder into WebDataset shards (``python -m dip_lightning prepare``).

Input: an ImageFolder (one sub-folder per class; the class index is the folder's position in the sorted list, or in
the ``classes.txt`` already in the output, so train and val agree) or a flat folder plus a label file (ImageNet's
``LOC_val_solution.csv`` as is). Samples are shuffled globally with a seed, then cut into shards in
``webdataset.TarWriter``'s layout with a fixed mtime, so reruns give the same bytes. Shards are written atomically
with a record each; a rerun skips complete shards, so an interrupted run resumes to the same bytes. What cannot be
used is skipped and listed with the reason in ``<split>-manifest.json`` (written last), never an abort of the run
nor a hang: unreadable folders and files, names that are not UTF-8, anything but regular files (a FIFO would block
the reader forever), undecodable images and images beyond the :class:`~dip_lightning.core.data.preprocess.ImageLimits`
(checked from the header, before decoding). Pool workers die with the process that started them.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dip_lightning.core.atomic import atomic_write, atomic_write_json, leftover_temp_files
from dip_lightning.core.data.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from dip_lightning.core.errors import KitError

FORMAT_VERSION = 1
_TAR_MTIME = 946684800  # 2000-01-01: fixed so that reruns produce identical tar bytes


class PrepareError(KitError, ValueError):
    """The source folder, its label or class files, or the options cannot make shards; the message says why."""


class SourceUnreadable(KitError, ValueError):
    """The source folder itself cannot be listed."""


class ShardPathTaken(KitError, FileExistsError):
    """Something other than a shard file sits where ``prepare`` writes one."""


class NotARegularFile(KitError, OSError):
    """An input that is not a regular file (FIFO, socket, device): skipped unread."""


@dataclass(frozen=True)
class ShardConfig:
    """Everything that changes the bytes of the shards (part of the resume check)."""

    split: str
    image_size: int
    format: str  # png | jpg | orig
    quality: int
    png_level: int
    preprocess: str  # adm | none
    shard_size: int
    seed: int
    max_pixels: int  # inputs beyond these limits are skipped (ImageLimits): they change which samples exist
    max_bytes: int


# ------------------------------------------------------------------------------------------ inputs
def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def read_classes_file(path: str | Path) -> list[str]:
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise PrepareError(f"{path}: duplicate class names")
    return names


Skipped = dict[str, str]  # {"path": relative path (undecodable bytes as \\xNN), "error": why}


def _printable(path: str) -> str:
    """A path as JSON and terminals take it: the bytes of a name that is not UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _skip(path: str, why: str) -> Skipped:
    return {"path": _printable(path), "error": why}


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir's surrogate escapes of undecodable bytes
        return True
    return False


def _special_kind(entry: os.DirEntry) -> str:
    """What an entry that is neither a folder nor a regular file is."""
    try:
        mode = entry.stat().st_mode
    except OSError:
        return "a broken symbolic link"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _classify(entry: os.DirEntry) -> str:
    """``"file"``, ``"folder"``, or why the entry is skipped."""
    if _not_utf8(entry.name):
        return "the name is not valid UTF-8: rename it"
    try:
        if entry.is_dir(follow_symlinks=False):
            return "folder"
        if entry.is_dir():
            return "a symbolic link to a folder (not followed)"
        if entry.is_file():
            return "file"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    return f"{_special_kind(entry)}, not a regular file"


def _list_folder(src: Path, rel: str, skipped: list[Skipped]) -> list[os.DirEntry] | None:
    """The visible entries of ``src / rel`` sorted by name, or None (and a skip record) if it cannot be listed."""
    try:
        with os.scandir(src / rel if rel else src) as it:
            return sorted((e for e in it if not _is_hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        skipped.append(_skip(rel + "/", f"unreadable folder: {type(exc).__name__}: {exc.strerror or exc}"))
        return None


def walk_files(src: Path, rel: str, skipped: list[Skipped]) -> list[str]:
    """The regular files below ``src / rel`` (relative to ``src``) in ``os.walk`` order: a folder's files sorted,
    then its sub-folders one after the other. Anything that cannot be used is added to ``skipped``."""
    entries = _list_folder(src, rel, skipped)
    if entries is None:
        return []
    files: list[str] = []
    folders: list[str] = []
    for entry in entries:
        path = f"{rel}/{entry.name}" if rel else entry.name
        kind = _classify(entry)
        if kind == "file":
            files.append(path)
        elif kind == "folder":
            folders.append(path)
        else:
            skipped.append(_skip(path, kind))
    for folder in folders:
        files += walk_files(src, folder, skipped)
    return files


def _class_folders(src: Path, skipped: list[Skipped]) -> list[str]:
    entries = _list_folder(src, "", [])
    if entries is None:
        raise SourceUnreadable(f"cannot list --src {str(src)!r}: check its permissions")
    folders = []
    for entry in entries:
        kind = _classify(entry)
        if kind == "folder":
            folders.append(entry.name)
        elif kind != "file":
            skipped.append(_skip(entry.name, kind))
    return folders


def list_image_folder(
    src: Path, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, int]], list[Skipped]]:
    """``(classes, [(relative path, label)], skipped)`` for a one-folder-per-class layout (recursive).

    An unreadable class folder stays a class (its index must not shift) and is listed in ``skipped``.
    """
    skipped: list[Skipped] = []
    folders = _class_folders(src, skipped)
    if not folders:
        raise PrepareError(
            f"{src} has no class sub-folders (expected an ImageFolder layout, or pass --labels)"
        )
    if classes is None:
        classes = folders
    index = {name: i for i, name in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise PrepareError(
            f"{len(unknown)} folder(s) of {src} are not in the class list ({len(classes)} classes), "
            f"e.g. {unknown[:3]}; check --classes or the classes.txt in --out"
        )
    items = [(rel, index[folder]) for folder in folders for rel in walk_files(src, folder, skipped)]
    return classes, items, skipped


def read_label_file(path: str | Path) -> list[tuple[str, str]]:
    """``[(file name or stem, label string)]`` from a ``name label`` / ``name,label ...`` file."""
    rows: list[tuple[str, str]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"[,\s]+", line)
            if len(parts) < 2:
                raise PrepareError(f"{path}:{lineno}: expected '<file> <label>', got {line!r}")
            rows.append((parts[0], parts[1]))
    return rows


def list_flat_folder(
    src: Path, labels_file: Path, classes: list[str] | None
) -> tuple[list[str], list[tuple[str, int]], list[Skipped]]:
    """``(classes, items, skipped)`` for a flat folder plus a label file (``skipped``: unlabelled or unusable
    files; sub-folders are not read)."""
    unlabelled: list[Skipped] = []
    entries = _list_folder(src, "", unlabelled)
    if entries is None:
        raise SourceUnreadable(f"cannot list --src {str(src)!r}: check its permissions")
    kinds = {e.name: _classify(e) for e in entries}
    files = [name for name, kind in kinds.items() if kind == "file"]
    unlabelled += [_skip(name, kind) for name, kind in kinds.items() if kind not in ("file", "folder")]
    known = set(files) | {name.split(".", 1)[0] for name in files}
    rows = read_label_file(labels_file)
    if rows and rows[0][0] not in known:
        rows = rows[1:]  # a header line such as "ImageId,PredictionString"
    if classes is None:
        if any(label.isdigit() for _, label in rows):
            raise PrepareError(
                f"{labels_file} has integer labels: pass --classes (or prepare the train split first)"
            )
        classes = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    by_name: dict[str, int] = {}
    for name, label in rows:
        if label in index:
            by_name[name] = index[label]
        elif label.isdigit() and int(label) < len(classes):
            by_name[name] = int(label)
        else:
            raise PrepareError(
                f"{labels_file}: label {label!r} of {name!r} is neither a class name nor an index"
            )
    items: list[tuple[str, int]] = []
    for name in files:
        label = by_name.get(name, by_name.get(name.split(".", 1)[0]))
        if label is None:
            unlabelled.append({"path": name, "error": f"no label in {labels_file.name}"})
        else:
            items.append((name, label))
    return classes, items, unlabelled


# ------------------------------------------------------------------------------------------ shard writing
def read_input(path: str, limits: ImageLimits) -> bytes:
    """The bytes of one input file; raises for anything but a regular file within ``limits.max_bytes``.

    Opened non-blocking: a FIFO opened for reading waits for a writer forever (a regular file ignores the flag).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"not a regular file (mode {stat.filemode(info.st_mode)}); skipped unread")
        limits.check_encoded(info.st_size)
        return f.read()


def encode_for_shard(data: bytes, cfg: ShardConfig) -> tuple[str, bytes]:
    """Decode-check and convert one input file; raises for anything unreadable or beyond the config's limits
    (:class:`~dip_lightning.core.data.preprocess.ImageTooLarge`, before decoding)."""
    from dip_lightning.core.data.preprocess import encode_image, open_checked, preprocess, to_rgb

    img = open_checked(data, ImageLimits(cfg.max_pixels, cfg.max_bytes))
    img.load()  # full decode: a truncated file fails here
    if cfg.format == "orig":
        if img.format in ("JPEG", "PNG", "WEBP"):
            return {"JPEG": "jpg"}.get(img.format, img.format.lower()), data
        return encode_image(to_rgb(img), "png", png_level=cfg.png_level)  # lossless for anything exotic
    out = preprocess(img, cfg.image_size, cfg.preprocess)
    return encode_image(out, cfg.format, cfg.quality, cfg.png_level)


def _safe_stem(rel: str) -> str:
    stem = os.path.basename(rel).split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:60] or "x"


class ShardTarWriter:
    """Writes samples in the tar layout of ``webdataset.TarWriter``: ustar members ``<key>.<ext>``, a
    sample's members in sorted extension order, fixed mtime / owner / mode (reproducible bytes).

    Written with :mod:`tarfile` directly because ``import webdataset`` pulls in torch (seconds per pool
    worker); the readers (``wds.WebDataset``, ``tar``, this package) see the same thing.
    """

    def __init__(self, fileobj: io.BufferedIOBase) -> None:
        # "w:", not the stream mode "w|" (same bytes): a stream left unclosed by a failed write (a full disk)
        # flushes again when garbage-collected and prints "write to closed file" over the real error.
        self._tar = tarfile.open(fileobj=fileobj, mode="w:", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
            info.uname = info.gname = "dip"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


def write_shard(task: dict) -> dict:
    """Write one shard (runs in a pool worker). Returns its record; bad inputs are listed, never raised."""
    cfg = ShardConfig(**task["config"])
    out = Path(task["out"])
    bad: list[dict[str, str]] = []
    counts: dict[int, int] = {}
    written = 0
    with atomic_write(out / task["name"]) as f:
        writer = ShardTarWriter(f)
        for key, rel, label in task["items"]:
            try:
                data = read_input(os.path.join(task["src"], rel), ImageLimits(cfg.max_pixels, cfg.max_bytes))
                ext, payload = encode_for_shard(data, cfg)
            except Exception as exc:  # noqa: BLE001 - any unreadable input is skipped and reported
                bad.append({"path": rel, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            writer.write(key, {ext: payload, "cls": str(label).encode()})
            counts[label] = counts.get(label, 0) + 1
            written += 1
        writer.close()
        record = {
            "name": task["name"],
            "samples": written,
            "bytes": f.tell(),
            "class_counts": {str(k): v for k, v in sorted(counts.items())},
            "bad": bad,
            "planned": len(task["items"]),
            "plan_hash": task["plan_hash"],
        }
        # Record first, shard last: the shard's name appears only once the shard and its record are complete.
        atomic_write_json(Path(task["progress"]) / (task["name"] + ".json"), record)
    return record


def _shard_is_complete(out: Path, progress: Path, name: str, plan_hash: str) -> dict | None:
    final, rec_path = out / name, progress / (name + ".json")
    if not (final.is_file() and rec_path.is_file()):
        return None
    try:
        with open(rec_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("plan_hash") != plan_hash or record.get("bytes") != final.stat().st_size:
        return None
    return record


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _brace_pattern(split: str, n: int) -> str:
    return f"{split}-000000.tar" if n == 1 else f"{split}-{{000000..{n - 1:06d}}}.tar"


def prepare_split(
    src: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    image_size: int = 256,
    format: str = "png",
    quality: int = 95,
    png_level: int = 1,
    preprocess: str = "adm",
    shard_size: int = 1000,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_BYTES,
    labels: str | Path | None = None,
    classes: str | Path | Sequence[str] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    source_note: str | None = None,
    on_shard_done: Callable[[dict], None] | None = None,
) -> dict:
    """Prepare one split; returns the manifest (also written to ``<out>/<split>-manifest.json``).

    Args:
        src: an ImageFolder (one sub-folder per class) or, with ``labels``, a flat folder of images.
        out: the shard folder; shards of other splits may share it (``classes.txt`` keeps their indices equal).
        split: shard name prefix (``train`` -> ``train-000000.tar``).
        image_size: side of the stored images after ``preprocess``.
        format: ``png`` (lossless), ``jpg`` (``quality``) or ``orig`` (the input bytes, cropped at load time).
        quality: JPEG quality.
        png_level: PNG compression level (0-9; 1 is fast and only a little larger).
        preprocess: ``adm`` (the ADM centre crop) or ``none`` (cropped at load time).
        shard_size: samples per shard.
        seed: seed of the global shuffle before sharding.
        max_pixels: an input whose header declares more pixels is skipped undecoded (the default passes every
            ImageNet image and refuses decompression bombs).
        max_image_bytes: an input file larger than this, or whose decoded size would be, is skipped.
        labels: label file of a flat folder (``<file> <label>`` lines; ImageNet's ``LOC_val_solution.csv``).
        classes: class list (a file or names); default: ``<out>/classes.txt``, else the sorted folder names.
        workers: processes writing shards (default: the CPUs this process may use).
        overwrite: replace shards of another source or configuration instead of refusing.
        progress: show a progress bar.
        source_note: free text stored in the manifest (where the images came from).
        on_shard_done: called with each shard's record as it completes.
    """
    t0 = time.time()
    src, out = Path(src), Path(out)
    _check_options(src, split, image_size, format, quality, png_level, preprocess, shard_size)
    ImageLimits(max_pixels, max_image_bytes)  # checks the values
    out.mkdir(parents=True, exist_ok=True)
    cfg = ShardConfig(
        split,
        image_size,
        format,
        quality,
        png_level,
        preprocess,
        shard_size,
        seed,
        max_pixels,
        max_image_bytes,
    )
    class_list, items, skipped, layout = _list_inputs(src, out, labels, classes)
    planned, plan_hash = _plan(items, cfg, src)
    names = [f"{split}-{k:06d}.tar" for k in range(max(1, -(-len(planned) // shard_size)))]
    progress_dir = _claim_output(out, cfg, src, plan_hash, overwrite)
    records, tasks = _pending_shards(src, out, progress_dir, names, planned, cfg, plan_hash)
    workers = min(workers or _default_workers(), max(1, len(tasks)))
    _run_tasks(tasks, records, workers, progress, len(planned), split, on_shard_done)
    shards = [records[k] for k in range(len(names))]
    manifest = _manifest(cfg, src, labels, layout, class_list, len(items), skipped, shards, plan_hash)
    manifest |= {
        "source": manifest["source"] | {"note": source_note},
        "elapsed_s": round(time.time() - t0, 2),
    }
    atomic_write_json(
        out / f"{split}-manifest.json", manifest
    )  # last: its presence means the split is complete
    return manifest


def _check_options(
    src: Path,
    split: str,
    image_size: int,
    format: str,
    quality: int,
    png_level: int,
    preprocess: str,
    shard_size: int,
) -> None:
    from dip_lightning.core.data.preprocess import PREPROCESS_MODES, STORAGE_FORMATS

    if not src.is_dir():
        raise FileNotFoundError(f"--src {str(src)!r} is not a folder")
    if format not in STORAGE_FORMATS:
        raise PrepareError(f"format must be one of {STORAGE_FORMATS}, got {format!r}")
    if preprocess not in PREPROCESS_MODES:
        raise PrepareError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise PrepareError(f"split must be alphanumeric (it prefixes shard names), got {split!r}")
    if image_size < 1 or shard_size < 1 or not 1 <= quality <= 100 or not 0 <= png_level <= 9:
        raise PrepareError("need image_size >= 1, shard_size >= 1, 1 <= quality <= 100, 0 <= png_level <= 9")


def _list_inputs(
    src: Path, out: Path, labels: str | Path | None, classes: str | Path | Sequence[str] | None
) -> tuple[list[str], list[tuple[str, int]], list[Skipped], str]:
    """``(class list, [(relative path, label)], skipped inputs, layout)``; writes ``<out>/classes.txt``.

    The class list is the one given, else the one already in ``out`` (train before val, so both splits index
    classes alike), else the folder names.
    """
    classes_path = out / "classes.txt"
    if isinstance(classes, (str, Path)):
        class_list: list[str] | None = read_classes_file(classes)
    elif classes is not None:
        class_list = list(classes)
    elif classes_path.is_file():
        class_list = read_classes_file(classes_path)
    else:
        class_list = None
    if labels is not None:
        class_list, items, skipped = list_flat_folder(src, Path(labels), class_list)
        layout = "flat+labels"
    else:
        class_list, items, skipped = list_image_folder(src, class_list)
        layout = "imagefolder"
    if classes_path.is_file():
        if read_classes_file(classes_path) != class_list:
            raise PrepareError(f"{classes_path} lists other classes than this run; use another --out")
    else:
        classes_path.write_text("".join(name + "\n" for name in class_list))
    return class_list, items, skipped, layout


def _plan(
    items: list[tuple[str, int]], cfg: ShardConfig, src: Path
) -> tuple[list[tuple[str, str, int]], str]:
    """The deterministic global shuffle, as ``(key, relative path, label)`` in shard order, and its hash (the
    resume unit: a rerun with the same hash continues, another hash is another dataset)."""
    import numpy as np

    order = np.random.default_rng(cfg.seed).permutation(len(items))
    planned = [(f"{i:08d}_{_safe_stem(items[j][0])}", items[j][0], items[j][1]) for i, j in enumerate(order)]
    digest = hashlib.sha256(json.dumps({"config": asdict(cfg), "src": str(src.resolve())}).encode())
    for key, rel, label in planned:  # incremental: no 100 MB string for ImageNet's 1.28M files
        digest.update(f"{key}\0{rel}\0{label}\n".encode())
    return planned, digest.hexdigest()[:16]


def _claim_output(out: Path, cfg: ShardConfig, src: Path, plan_hash: str, overwrite: bool) -> Path:
    """Make ``out`` this plan's: remove what a killed run left, refuse (or with ``overwrite`` replace) shards of
    another plan, record the plan. Returns the progress folder."""
    split = cfg.split
    progress_dir = out / f".{split}-progress"
    plan_file = progress_dir / "plan.json"
    for leftover in leftover_temp_files(out, f"{split}-*.tar"):  # shards of a killed run, never complete
        leftover.unlink(missing_ok=True)
    existing = sorted(out.glob(f"{split}-*.tar"))
    in_the_way = [p for p in existing if not p.is_file()]
    if in_the_way:
        raise ShardPathTaken(
            f"{in_the_way[0]} is a folder (or another non-file) where prepare writes a shard file: move it away, "
            "or use another --out"
        )
    if overwrite:
        for path in [*existing, out / f"{split}-manifest.json"]:
            path.unlink(missing_ok=True)
        shutil.rmtree(progress_dir, ignore_errors=True)
    elif plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("plan_hash") != plan_hash:
            raise FileExistsError(
                f"{out} holds {split} shards from another source or configuration "
                f"({old.get('config')} from {old.get('src')}); pass --overwrite or use another --out"
            )
    elif existing:
        raise FileExistsError(
            f"{out} already holds {len(existing)} {split}-*.tar files not written by this tool"
        )
    progress_dir.mkdir(exist_ok=True)
    atomic_write_json(plan_file, {"plan_hash": plan_hash, "config": asdict(cfg), "src": str(src.resolve())})
    return progress_dir


def _pending_shards(
    src: Path,
    out: Path,
    progress_dir: Path,
    names: list[str],
    planned: list[tuple[str, str, int]],
    cfg: ShardConfig,
    plan_hash: str,
) -> tuple[dict[int, dict], list[tuple[int, dict]]]:
    """The records of the shards already complete, and a task for each of the others."""
    records: dict[int, dict] = {}
    tasks: list[tuple[int, dict]] = []
    for k, name in enumerate(names):
        done = _shard_is_complete(out, progress_dir, name, plan_hash)
        if done is not None:
            records[k] = done
            continue
        task = {
            "src": str(src),
            "out": str(out),
            "progress": str(progress_dir),
            "name": name,
            "items": planned[k * cfg.shard_size : (k + 1) * cfg.shard_size],
            "config": asdict(cfg),
            "plan_hash": plan_hash,
        }
        tasks.append((k, task))
    return records, tasks


def _manifest(
    cfg: ShardConfig,
    src: Path,
    labels: str | Path | None,
    layout: str,
    class_list: list[str],
    num_listed: int,
    skipped: list[Skipped],
    shards: list[dict],
    plan_hash: str,
) -> dict:
    """The split's manifest from the shard records and what the listing skipped."""
    class_counts = [0] * len(class_list)
    bad: list[Skipped] = list(skipped)
    for record in shards:
        for label, count in record["class_counts"].items():
            class_counts[int(label)] += count
        bad.extend(record["bad"])
    return {
        "format_version": FORMAT_VERSION,
        "tool": "dip_lightning prepare",
        "split": cfg.split,
        "num_samples": sum(record["samples"] for record in shards),
        "num_shards": len(shards),
        "pattern": _brace_pattern(cfg.split, len(shards)),
        "num_classes": len(class_list),
        "classes_file": "classes.txt",
        "image_size": cfg.image_size,
        "format": cfg.format,
        "quality": cfg.quality if cfg.format == "jpg" else None,
        "png_level": cfg.png_level if cfg.format == "png" else None,
        "preprocess": cfg.preprocess,
        # orig / none store full images: readers apply the ADM crop at load time.
        "crop_at_load": cfg.format == "orig" or cfg.preprocess == "none",
        "source": {
            "path": str(src.resolve()),
            "layout": layout,
            "labels_file": str(Path(labels).resolve()) if labels is not None else None,
            "num_files": num_listed + len(skipped),
        },
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "limits": {"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes},
        "plan_hash": plan_hash,
        "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]} for r in shards],
        "class_counts": {class_list[i]: c for i, c in enumerate(class_counts)},
        "num_bad": len(bad),
        "bad_files": bad,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _run_tasks(
    tasks: list[tuple[int, dict]],
    records: dict[int, dict],
    workers: int,
    show_progress: bool,
    total: int,
    split: str,
    on_shard_done: Callable[[dict], None] | None,
) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    already = sum(r["planned"] for r in records.values())
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[bad]} bad"),
    )
    with Progress(*columns, disable=not show_progress, transient=False) as bar:
        tid = bar.add_task(f"{split} ({len(tasks)} shards to write)", total=total, completed=already, bad=0)
        n_bad = 0

        def finished(k: int, record: dict) -> None:
            nonlocal n_bad
            records[k] = record
            n_bad += len(record["bad"])
            bar.update(tid, advance=record["planned"], bad=n_bad)
            if on_shard_done is not None:
                on_shard_done(record)

        if workers <= 1:
            for k, task in tasks:
                finished(k, write_shard(task))
            return
        # spawn: the progress bar runs a thread, and forking a threaded process is unsafe.
        ctx = multiprocessing.get_context("spawn")
        pool_options = {"initializer": die_with_parent, "initargs": (os.getpid(),)}
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **pool_options) as pool:
            futures = {pool.submit(write_shard, task): k for k, task in tasks}
            try:
                for fut in cf.as_completed(futures):
                    finished(futures[fut], fut.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


# ------------------------------------------------------------------------------------------ worker lifetime
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: this worker ends when ``parent_pid`` (the process that started it) dies, even by SIGKILL,
    which runs no cleanup and would otherwise leave the workers writing shards nobody collects.

    Linux: the kernel sends the worker SIGKILL (``PR_SET_PDEATHSIG``) the moment its parent ends; the worker has
    nothing to clean up (a shard it was writing is a temporary file the next run deletes). The signal is tied to
    the parent *thread* that started the worker: the pool is started and shut down by one call on one thread,
    which outlives its workers. Elsewhere a thread polls the parent's process id once a second.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent_pid:  # the parent died before the request took effect
                os._exit(1)
            return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)
