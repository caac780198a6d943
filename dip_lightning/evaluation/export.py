"""Sample export in the ADM evaluator's npz layout: ``arr_0`` uint8 (N, H, W, 3) images, ``arr_1`` int64 labels.

Sample ``i`` has label ``i % num_classes`` (or a seeded draw) and noise seed ``seed + i``, so an index gives the
same image whatever the batch size, process count or interruptions. Work is cut into chunks written atomically
under ``<out>.parts/`` and taken round-robin by the processes torchrun or srun started; a rerun skips finished
chunks, and ``job.json`` there records the settings and weights they were made with, so chunks of another export
are an error, never mixed in. Zip members carry fixed timestamps: the same settings give the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dip_lightning.core.atomic import atomic_write, atomic_write_json
from dip_lightning.core.images import to_uint8
from dip_lightning.core.seeding import sample_labels_and_seeds


# ---------------------------------------------------------------------------------------------- export
def chunk_path(parts_dir: Path, chunk: int) -> Path:
    return parts_dir / f"chunk_{chunk:06d}.npz"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` layout (uncompressed ``<name>.npy`` members) with fixed member timestamps, so equal arrays
    give equal files; written atomically, so a reader never sees a partial file."""
    with (
        atomic_write(path) as fh,
        zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of the module's state (names, dtypes, shapes and bytes): tells two sets of weights apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ExportMismatchError(RuntimeError):
    """An export folder holds chunks made with other settings or weights (nothing is changed)."""


def _check_job(parts: Path, job: dict[str, Any]) -> None:
    """Record the export's settings in ``parts/job.json``, or check that existing chunks share them."""
    path = parts / "job.json"
    if path.exists():
        found = json.loads(path.read_text())
        differ = sorted(k for k in set(found) | set(job) if found.get(k) != job.get(k))
        if differ:
            raise ExportMismatchError(
                f"{parts} holds chunks of another export (different {', '.join(differ)}); remove that folder "
                "or choose another --out (nothing was changed)."
            )
        return
    atomic_write_json(path, job)  # ranks starting together write the same content


def export_samples(
    module: Any,
    out: str | os.PathLike,
    num_samples: int,
    batch_size: int = 64,
    chunk_size: int = 1000,
    seed: int = 0,
    balanced: bool = True,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    max_chunks: int | None = None,
    wait_timeout: float = 3600.0,
    **sampler_overrides: Any,
) -> Path | None:
    """Generate ``num_samples`` images into ``out`` (ADM npz). Returns the path once complete, else None.

    ``max_chunks`` stops after that many new chunks (used by tests to simulate a killed export).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (nothing was changed).")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    num_chunks = -(-num_samples // chunk_size)
    module = module.to(device).eval()
    num_classes = module.num_classes
    make_sampler = getattr(module, "make_sampler", None)
    job = {
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        "seed": seed,
        "balanced": balanced,
        "num_classes": num_classes,
        "sampler": repr(make_sampler(**sampler_overrides)) if make_sampler else repr(sampler_overrides),
        "sample_dtype": str(getattr(module, "sample_dtype", "")),
        # Compiled kernels round differently from eager ones: one export uses one of them throughout.
        "compile": str(getattr(module, "compiled_mode", None)),
        # Which weights of the checkpoint (which EMA decay, raw, post-hoc): chunks of two sets never mix.
        "weights": getattr(module, "loaded_weights", None),
        "weights_sha256": weights_fingerprint(module),
    }
    _check_job(parts, job)
    done_now = 0
    for chunk in range(rank, num_chunks, world_size):
        path = chunk_path(parts, chunk)
        if path.exists():
            continue
        if max_chunks is not None and done_now >= max_chunks:
            return None
        chunk_start = time.perf_counter()
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, num_samples)
        indices = np.arange(start, stop, dtype=np.int64)
        labels, seeds = sample_labels_and_seeds(indices, num_classes, seed, balanced)
        images = []
        for b in range(0, len(indices), batch_size):
            y = torch.from_numpy(labels[b : b + batch_size])
            x = module.generate(y, torch.from_numpy(seeds[b : b + batch_size]), **sampler_overrides)
            # The project's uint8 convention (as grids, FID, predict): an index gives the same pixels.
            images.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
        _save_npz(path, images=np.concatenate(images), labels=labels, indices=indices)
        done_now += 1
        seconds = time.perf_counter() - chunk_start
        print(
            f"chunk {chunk + 1}/{num_chunks} (rank {rank}): {len(indices)} images in {seconds:.1f} s "
            f"({len(indices) / max(seconds, 1e-9):.1f} img/s)",
            flush=True,
        )
    # Whoever sees every chunk assembles the result; others are done.
    deadline = time.monotonic() + (wait_timeout if rank == 0 else 0.0)
    while True:
        missing = [c for c in range(num_chunks) if not chunk_path(parts, c).exists()]
        if not missing:
            break
        if time.monotonic() >= deadline:
            return None
        time.sleep(2.0)
    if out.exists() and not overwrite:
        return out  # another process assembled it
    arrays = [np.load(chunk_path(parts, c)) for c in range(num_chunks)]
    images = np.concatenate([a["images"] for a in arrays])
    labels = np.concatenate([a["labels"] for a in arrays])
    indices = np.concatenate([a["indices"] for a in arrays])
    if not np.array_equal(indices, np.arange(num_samples)):
        raise RuntimeError(
            f"chunks in {parts} do not cover 0..{num_samples - 1} exactly; remove the folder and rerun"
        )
    _save_npz(out, arr_0=images, arr_1=labels)
    return out
