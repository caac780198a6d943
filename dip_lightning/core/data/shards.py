"""Shard listing, indexing and reading.

Shards follow the WebDataset convention: a POSIX tar whose consecutive members ``<key>.<ext>`` form a sample (the
image under ``png`` / ``jpg`` / ..., ``cls`` an ASCII integer); :mod:`.prepare` and any standard writer produce it.
Local uncompressed tars are indexed by a header scan and read by offset (``os.pread``, only the needed image
decoded); anything else (``http://``, ``s3://``, ``pipe:``, compressed) is streamed through webdataset's readers.
Both number samples by first appearance of their key, as webdataset's ``group_by_keys``. Per-shard sample counts
come from the prepare manifest when there is one, else from the scan.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dip_lightning.core.data.preprocess import DEFAULT_LIMITS, ImageLimits, decode_image
from dip_lightning.core.errors import ConfigError, KitError

# Image extensions tried in this order when a sample has several.
IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")
_GLOB_CHARS = re.compile(r"[*?\[]")
# webdataset's key/extension split: the key is everything up to the first dot of the last path component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")

ShardSpec = str | Sequence[str]


class ShardIsAFolder(KitError, IsADirectoryError):
    """A shard name that is a folder, where a shard file belongs."""


class DamagedShardWarning(RuntimeWarning):
    """A shard that holds fewer samples than its manifest names, or whose tar ends early."""


# ------------------------------------------------------------------------------------------ listing
def is_remote(url: str) -> bool:
    """True for anything that must be streamed (URLs with a scheme other than ``file://``, ``pipe:``)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _folder_note(folder: str) -> str:
    if not os.path.isdir(folder):
        return f"folder {folder!r} does not exist"
    tars = sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tar") and p.is_file())
    if not tars:
        return f"folder {folder!r} exists but holds no .tar files"
    shown = ", ".join(tars[:3]) + (", ..." if len(tars) > 3 else "")
    return f"folder {folder!r} holds {len(tars)} .tar file(s): {shown}"


def _refuse_folders(part: str, paths: Sequence[str]) -> None:
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        raise ShardIsAFolder(
            f"{folders[0]!r} (pattern {part!r}) is a folder, not a shard file"
            + (f"; so are {len(folders) - 1} more" if len(folders) > 1 else "")
            + ": a shard is a .tar file; point the pattern at the shard files, or move the folder away"
        )


def expand_shards(spec: ShardSpec) -> list[str]:
    """Expand brace patterns (``train-{000000..000146}.tar``), globs and ``::``-joined lists into shard URLs.

    Local names must exist: a glob that matches nothing or a brace range with missing members raises
    ``FileNotFoundError`` naming the pattern and the folder. Remote URLs are passed through unchecked.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ConfigError("empty shard list")
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"shard patterns must be non-empty strings, got {item!r}")
        for part in item.split("::"):
            urls.extend(_expand_pattern(os.path.expanduser(part.strip())))
    return urls


def _expand_pattern(part: str) -> list[str]:
    """The shards one brace/glob pattern names (see :func:`expand_shards`)."""
    from braceexpand import braceexpand

    urls: list[str] = []
    missing: list[str] = []
    for url in braceexpand(part):
        path = _local(url)
        if is_remote(url):
            urls.append(url)
        elif _GLOB_CHARS.search(path):
            found = sorted(glob.glob(path))
            _refuse_folders(part, found)  # never skipped in silence: its samples would be missing
            matches = [m for m in found if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(
                    f"no shard matches pattern {part!r}: {_folder_note(os.path.dirname(path) or '.')}"
                )
            urls.extend(matches)
        elif os.path.isfile(path):
            urls.append(path)
        else:
            missing.append(path)
    if missing:
        _refuse_folders(part, missing)
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of pattern {part!r} do not exist (first: {missing[0]!r}); "
            f"{_folder_note(os.path.dirname(missing[0]) or '.')}"
        )
    return urls


# ------------------------------------------------------------------------------------------ index
@dataclass
class TarIndex:
    """Offsets of the image and ``cls`` member of every sample of one local tar.

    ``table[i] = (image_offset, image_size, cls_offset, cls_size, image_ext_code)``, ``-1`` where absent;
    ``image_ext_code`` indexes :data:`IMAGE_EXTS`. ``error`` says why the scan stopped early (truncation).
    """

    path: str
    table: np.ndarray
    error: str | None = None

    def __len__(self) -> int:
        return int(self.table.shape[0])


def _split_name(name: str) -> tuple[str | None, str]:
    m = _KEY_EXT.match(name)
    if m is None:
        return None, ""
    return m.group(1), m.group(2).lower()


def _sample_member(info: tarfile.TarInfo) -> tuple[str | None, str]:
    """``(sample key, extension)`` of a tar member that belongs to a sample; ``(None, "")`` for anything else
    (folders, links, ``__meta__`` members, names without an extension)."""
    if not info.isreg() or _META.match(info.name):
        return None, ""
    if "/" not in info.name and info.name.startswith("__") and info.name.endswith("__"):
        return None, ""
    return _split_name(info.name)


def index_tar(path: str) -> TarIndex:
    """Scan the headers of a local uncompressed tar (no data is read). Never raises for a damaged file."""
    file_size = os.path.getsize(path)
    rows: list[list[int]] = []
    current_key: str | None = None
    error: str | None = None
    try:
        tf = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as exc:
        return TarIndex(path, np.zeros((0, 5), np.int64), f"not a readable tar: {exc}")
    with tf:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as exc:
                error = f"tar damaged after {len(rows)} samples: {exc}"
                break
            if info is None:
                break
            tf.members.clear()  # the scan keeps its own table; TarFile would otherwise hold every TarInfo
            if info.isreg() and info.offset_data + info.size > file_size:
                error = f"tar truncated after {len(rows)} samples ({info.name!r} ends past the file end)"
                break
            key, ext = _sample_member(info)
            if key is None:
                continue
            if key != current_key:
                rows.append([-1, -1, -1, -1, -1])
                current_key = key
            _add_member(rows[-1], info, ext)
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    return TarIndex(path, table, error)


def _add_member(row: list[int], info: tarfile.TarInfo, ext: str) -> None:
    """Record a member in its sample's :class:`TarIndex` row: the first ``cls``, and the image of the preferred
    extension (the first of :data:`IMAGE_EXTS`) when a sample has several."""
    if ext == "cls" and row[2] < 0:
        row[2], row[3] = info.offset_data, info.size
    elif ext in IMAGE_EXTS:
        code = IMAGE_EXTS.index(ext)
        if row[4] < 0 or code < row[4]:
            row[0], row[1], row[4] = info.offset_data, info.size, code


def is_random_access(url: str) -> bool:
    """Local uncompressed tars are read by offset; anything else is streamed."""
    if is_remote(url):
        return False
    path = _local(url)
    try:
        with open(path, "rb") as f:
            magic = f.read(3)
    except OSError:
        return True  # let the reader report the error on use
    return magic[:2] != b"\x1f\x8b" and magic != b"BZh" and not path.endswith((".gz", ".tgz", ".xz", ".bz2"))


class LocalReader:
    """Per-process cache of tar indexes and open file descriptors; reads samples with ``os.pread``."""

    def __init__(self, max_open: int = 64) -> None:
        self._indexes: dict[str, TarIndex] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._max_open = max_open
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        # After a fork the descriptors are shared with the parent; pread has no shared offset, but an
        # eviction in one process must not close the other's descriptor, so a child starts afresh.
        if os.getpid() != self._pid:
            self._fds = OrderedDict()
            self._pid = os.getpid()

    def index(self, url: str) -> TarIndex:
        path = _local(url)
        idx = self._indexes.get(path)
        if idx is None:
            idx = index_tar(path)
            self._indexes[path] = idx
        return idx

    def _fd(self, path: str) -> int:
        self._check_fork()
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        if len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _pread(self, fd: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def read(self, url: str, member: int, limits: ImageLimits = DEFAULT_LIMITS) -> dict[str, bytes]:
        """Sample ``member`` of the shard as ``{ext: bytes, "cls": bytes}`` (only the image and ``cls``); an image
        member above ``limits.max_bytes`` raises without being read."""
        idx = self.index(url)
        if member >= len(idx):
            why = idx.error or f"the shard holds {len(idx)} samples"
            raise IndexError(f"sample {member} missing from {url}: {why}")
        img_off, img_size, cls_off, cls_size, code = (int(v) for v in idx.table[member])
        fd = self._fd(_local(url))
        sample: dict[str, bytes] = {}
        if code >= 0:
            limits.check_encoded(img_size)
            sample[IMAGE_EXTS[code]] = self._pread(fd, img_size, img_off)
        if cls_off >= 0:
            sample["cls"] = self._pread(fd, cls_size, cls_off)
        return sample

    def key(self, url: str, member: int) -> str:
        """The sample's key, read back from the tar header (for messages only)."""
        try:
            idx = self.index(url)
            off = int(idx.table[member][0] if idx.table[member][0] >= 0 else idx.table[member][2])
            header = self._pread(self._fd(_local(url)), 512, off - 512)
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            return _split_name(name)[0] or name
        except Exception:  # noqa: BLE001 - best effort for an error message
            return f"#{member}"

    def close(self) -> None:
        self._check_fork()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_READER: LocalReader | None = None


def local_reader() -> LocalReader:
    """The process-wide :class:`LocalReader` (each DataLoader worker gets its own after fork/spawn)."""
    global _READER
    if _READER is None:
        _READER = LocalReader()
    return _READER


# ------------------------------------------------------------------------------------------ streaming
def stream_samples(url: str, on_error: Callable[[BaseException], None] | None = None) -> Iterator[dict]:
    """Stream one shard through webdataset's opener and tar iterators; yields wds sample dicts in tar order.

    Errors (an unreachable URL, a truncated or corrupt tar) end the shard early after ``on_error`` sees them;
    a truncated stream therefore ends instead of hanging.
    """
    from webdataset import tariterators

    def handler(exc: BaseException) -> bool:
        if on_error is not None:
            on_error(exc)
        return True

    src = tariterators.url_opener([{"url": url}], handler=handler)
    files = tariterators.tar_file_expander(src, handler=handler)
    yield from tariterators.group_by_keys(files, handler=handler)


# ------------------------------------------------------------------------------------------ counts
_MANIFEST_CACHE: dict[str, dict[str, dict] | None] = {}


def _manifest_entries(folder: str) -> dict[str, dict]:
    """``{shard file name: manifest entry}`` from every ``*manifest.json`` in a local folder."""
    if folder in _MANIFEST_CACHE:
        return _MANIFEST_CACHE[folder] or {}
    entries: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*manifest.json"))):
        try:
            with open(path) as f:
                manifest = json.load(f)
            for shard in manifest.get("shards", []):
                entries[shard["name"]] = shard
        except (OSError, ValueError, KeyError, TypeError):
            continue
    _MANIFEST_CACHE[folder] = entries
    return entries


def _remote_manifest_entries(url: str) -> dict[str, dict]:
    if url.startswith("pipe:") or "/" not in url:
        return {}
    base, name = url.rsplit("/", 1)
    if base in _MANIFEST_CACHE:
        return _MANIFEST_CACHE[base] or {}
    entries: dict[str, dict] = {}
    prefix = name.rsplit("-", 1)[0] if "-" in name else ""
    from webdataset import gopen

    for candidate in ([f"{prefix}-manifest.json"] if prefix else []) + ["manifest.json"]:
        try:
            with gopen.gopen(f"{base}/{candidate}") as f:
                manifest = json.loads(f.read())
            entries = {s["name"]: s for s in manifest.get("shards", [])}
            break
        except Exception:  # noqa: BLE001 - a missing manifest is the normal case
            continue
    _MANIFEST_CACHE[base] = entries
    return entries


def shard_sample_counts(urls: Sequence[str]) -> list[int]:
    """Number of samples per shard: the manifest's if it lists the shard, else a scan.

    A local shard whose size differs from the one its manifest recorded is scanned: one holding fewer samples than
    the manifest names keeps the manifest's count, so that the missing samples are read as bad samples (counted
    against ``max_bad_fraction``), and is reported with a :class:`DamagedShardWarning` naming it and the counts, as
    is a shard whose tar ends early.
    """
    counts: list[int] = []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if is_remote(url):
            entry = _remote_manifest_entries(url).get(name)
            if entry is not None:
                counts.append(int(entry["samples"]))
            else:
                counts.append(sum(1 for _ in stream_samples(url)))
            continue
        path = _local(url)
        entry = _manifest_entries(os.path.dirname(os.path.abspath(path))).get(name)
        if entry is not None and int(entry.get("bytes", -1)) == os.path.getsize(path):
            counts.append(int(entry["samples"]))
        elif is_random_access(url):
            counts.append(_scanned_count(url, None if entry is None else int(entry["samples"])))
        else:
            counts.append(sum(1 for _ in stream_samples(url)))
    return counts


def _scanned_count(url: str, promised: int | None) -> int:
    """The sample count of a local shard from a header scan, reported when the shard is damaged."""
    index = local_reader().index(url)
    found = len(index)
    why = f" ({index.error})" if index.error else ""
    if promised is not None and found < promised:
        warnings.warn(
            f"shard {url} holds {found} of the {promised} samples its manifest names{why}: the "
            f"{promised - found} missing samples count as bad samples (max_bad_fraction); copy the shard again "
            "or rerun prepare",
            DamagedShardWarning,
            stacklevel=3,
        )
        return promised
    if index.error:
        warnings.warn(
            f"shard {url} is damaged: {found} samples readable{why}; copy it again or rewrite it",
            DamagedShardWarning,
            stacklevel=3,
        )
    return found


def read_class_names(urls: Sequence[str]) -> list[str] | None:
    """``classes.txt`` next to the first local shard, if present."""
    for url in urls:
        if is_remote(url):
            continue
        path = os.path.join(os.path.dirname(os.path.abspath(_local(url))), "classes.txt")
        if os.path.isfile(path):
            with open(path) as f:
                return [line.strip() for line in f if line.strip()]
        return None
    return None


# ------------------------------------------------------------------------------------------ decode
def image_member(sample: Mapping[str, object]) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def decode_sample(
    sample: Mapping[str, bytes],
    image_size: int | None,
    crop_offset: float | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, int]:
    """``(H, W, 3)`` uint8 image (ADM-cropped to ``image_size`` if needed, or randomly cropped at ``crop_offset``:
    :func:`~dip_lightning.core.data.preprocess.decode_image`, within ``limits``) and the integer label."""
    ext = image_member(sample)
    if ext is None:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample has no image member (members: {have})")
    if "cls" not in sample:
        raise ValueError("sample has no 'cls' member")
    label = int(sample["cls"])
    return decode_image(sample[ext], image_size, crop_offset, limits), label


def iter_shard_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """All ``(key, sample)`` pairs of one shard in order (webdataset's streaming reader; for tools)."""
    for sample in stream_samples(url):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}
