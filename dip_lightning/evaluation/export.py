"""Sample export in the ADM evaluator's npz layout: ``arr_0`` uint8 (N, H, W, 3) images, ``arr_1`` int64 labels.

Sample ``i`` has label ``i % num_classes`` (or a seeded draw) and noise seed ``seed + i``, so an index gives the
same image whatever the batch size, process count or interruptions. Work is cut into chunks written atomically
under ``<out>.parts/`` and taken round-robin by the processes torchrun or srun started; a rerun skips finished
chunks, and ``job.json`` there records the settings and weights they were made with, so chunks of another export
are an error, never mixed in. Zip members carry fixed timestamps: the same settings give the same file.
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dip_lightning.core.atomic import atomic_write, write_or_compare_json
from dip_lightning.core.errors import KitError
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


class ExportMismatchError(KitError, RuntimeError):
    """An export folder holds chunks made with other settings or weights (nothing is changed)."""


def _job_record(
    module: Any,
    num_samples: int,
    chunk_size: int,
    seed: int,
    balanced: bool,
    overrides: dict[str, Any],
    guide: Any = None,
) -> dict[str, Any]:
    """What makes the chunks of an export interchangeable: its settings and the weights they are made with."""
    make_sampler = getattr(module, "make_sampler", None)
    # Only an export with a guide records one, so the records of earlier exports stay valid.
    guided = {} if guide is None else {"guide_weights_sha256": weights_fingerprint(guide)}
    return {
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        "seed": seed,
        "balanced": balanced,
        "num_classes": module.num_classes,
        "sampler": repr(make_sampler(**overrides)) if make_sampler else repr(overrides),
        "sample_dtype": str(getattr(module, "sample_dtype", "")),
        # Compiled kernels round differently from eager ones: one export uses one of them throughout.
        "compile": str(getattr(module, "compiled_mode", None)),
        # Which weights of the checkpoint (which EMA decay, raw, post-hoc): chunks of two sets never mix.
        "weights": getattr(module, "loaded_weights", None),
        "weights_sha256": weights_fingerprint(module),
        **guided,
    }


def _check_job(parts: Path, job: dict[str, Any]) -> None:
    """Record the export's settings in ``parts/job.json``, or check that existing chunks share them."""
    differ = write_or_compare_json(parts / "job.json", job)  # ranks starting together write the same content
    if differ:
        raise ExportMismatchError(
            f"{parts} holds chunks of another export (different {', '.join(differ)}); remove that folder "
            "or choose another --out (nothing was changed)."
        )


def _generate_chunk(
    module: Any,
    indices: np.ndarray,
    batch_size: int,
    seed: int,
    balanced: bool,
    overrides: dict[str, Any],
    guide: Any = None,
) -> dict[str, np.ndarray]:
    """The images of sample ``indices`` with their labels: what one chunk file holds."""
    labels, seeds = sample_labels_and_seeds(indices, module.num_classes, seed, balanced)
    images = []
    for b in range(0, len(indices), batch_size):
        y = torch.from_numpy(labels[b : b + batch_size])
        x = module.generate(y, torch.from_numpy(seeds[b : b + batch_size]), guide=guide, **overrides)
        # The project's uint8 convention (as grids, FID, predict): an index gives the same pixels.
        images.append(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
    return {"images": np.concatenate(images), "labels": labels, "indices": indices}


def _wait_for_chunks(parts: Path, num_chunks: int, timeout: float) -> bool:
    """Whether every chunk file exists within ``timeout`` seconds (0: whether they exist now)."""
    deadline = time.monotonic() + timeout
    while any(not chunk_path(parts, c).exists() for c in range(num_chunks)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(2.0)
    return True


def _assemble(parts: Path, num_chunks: int, num_samples: int, out: Path) -> None:
    """Concatenate the chunks into ``out`` (``arr_0`` images, ``arr_1`` labels), checking they cover every index."""
    arrays = [np.load(chunk_path(parts, c)) for c in range(num_chunks)]
    images = np.concatenate([a["images"] for a in arrays])
    labels = np.concatenate([a["labels"] for a in arrays])
    indices = np.concatenate([a["indices"] for a in arrays])
    if not np.array_equal(indices, np.arange(num_samples)):
        raise RuntimeError(
            f"chunks in {parts} do not cover 0..{num_samples - 1} exactly; remove the folder and rerun"
        )
    _save_npz(out, arr_0=images, arr_1=labels)


def export_samples(
    module: Any,  # a loaded DiPModule (``generate``, ``num_classes``), moved to ``device`` here
    out: str | os.PathLike,  # the npz to write; its chunks go to ``<out>.parts/``
    num_samples: int,  # images in all
    batch_size: int = 64,  # images per ``generate`` call
    chunk_size: int = 1000,  # images per chunk file, the unit of resuming and of sharing among processes
    seed: int = 0,  # sample i has noise seed ``seed + i``
    balanced: bool = True,  # labels ``i % num_classes``; False draws them from the seed
    rank: int = 0,  # this process among ``world_size``: it makes chunks rank, rank + world_size, ...
    world_size: int = 1,
    device: str | torch.device = "cpu",
    overwrite: bool = False,  # replace an existing ``out``
    max_chunks: int | None = None,  # stop after this many new chunks (tests simulate a killed export)
    wait_timeout: float = 3600.0,  # seconds rank 0 waits for the other processes' chunks
    guide: Any = None,  # autoguidance: a guide DiPModule (``cfg_scale`` is then its weight)
    **sampler_overrides: Any,  # settings of :data:`~dip_lightning.core.diffusion.SAMPLER_OVERRIDES`
) -> Path | None:
    """Generate ``num_samples`` images into ``out`` (ADM npz). Returns the path once complete, else None."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (nothing was changed).")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    num_chunks = -(-num_samples // chunk_size)
    module = module.to(device).eval()
    _check_job(parts, _job_record(module, num_samples, chunk_size, seed, balanced, sampler_overrides, guide))
    done_now = 0
    for chunk in range(rank, num_chunks, world_size):
        path = chunk_path(parts, chunk)
        if path.exists():
            continue
        if max_chunks is not None and done_now >= max_chunks:
            return None
        chunk_start = time.perf_counter()
        indices = np.arange(chunk * chunk_size, min((chunk + 1) * chunk_size, num_samples), dtype=np.int64)
        images = _generate_chunk(module, indices, batch_size, seed, balanced, sampler_overrides, guide)
        _save_npz(path, **images)
        done_now += 1
        seconds = time.perf_counter() - chunk_start
        print(
            f"chunk {chunk + 1}/{num_chunks} (rank {rank}): {len(indices)} images in {seconds:.1f} s "
            f"({len(indices) / max(seconds, 1e-9):.1f} img/s)",
            flush=True,
        )
    # Whoever sees every chunk assembles the result; others are done.
    if not _wait_for_chunks(parts, num_chunks, wait_timeout if rank == 0 else 0.0):
        return None
    if out.exists() and not overwrite:
        return out  # another process assembled it
    _assemble(parts, num_chunks, num_samples, out)
    return out
