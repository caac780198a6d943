"""Which process this is: rank, world size and local rank, from the process group or the launcher.

The one place that knows the launchers' environment variables:

* torchrun / ``torch.distributed.run``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
* SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
* Lightning's own launcher (``devices=N`` without torchrun/srun) starts the other processes of a node with
  ``LOCAL_RANK``, ``NODE_RANK`` and ``WORLD_SIZE`` but no ``RANK``.

Before ``Trainer.fit`` has set up the process group only the launcher's variables tell the ranks apart (e.g.
which process may clean up a run folder); afterwards :func:`rank_and_world` reads the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ProcessPlace", "all_gather_rows", "is_distributed", "launch_place", "rank_and_world"]


@dataclass(frozen=True)
class ProcessPlace:
    """This process's global rank, the number of processes, and its rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def launch_place() -> ProcessPlace:
    """Rank, world size and local rank as the launcher set them; a process no launcher started is rank 0 of 1.

    A child of Lightning's launcher on node ``NODE_RANK > 0`` does not learn its exact global rank from the
    environment (the per-node process count is not exported); it gets ``NODE_RANK * WORLD_SIZE + LOCAL_RANK``,
    which is never 0 there, so "am I rank 0" is always answered right.
    """
    for rank_key, world_key, local_key in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        rank, world = _int(rank_key), _int(world_key)
        if rank is not None and world is not None:
            return ProcessPlace(rank, world, _int(local_key) or 0)
    local = _int("LOCAL_RANK")
    if local is not None:
        world = _int("WORLD_SIZE") or 1
        node = _int("NODE_RANK") or 0
        return ProcessPlace(node * world + local, world, local)
    return ProcessPlace()


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group when there is one, else as the launcher set them."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    place = launch_place()
    return place.rank, place.world_size


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves only CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor in rank order (ranks may hold different ``n_r``).

    Collective: call it on every rank. Without a process group it returns ``tensor`` unchanged. Rows are padded
    to the largest count for the gather and trimmed after it; the result is on ``tensor``'s device.
    """
    if not is_distributed():
        return tensor
    device = _collective_device(tensor)
    local = tensor.to(device).contiguous()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=device))
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(tensor.device)


def join_launched_processes() -> tuple[int, int, torch.device]:
    """Join the launcher's process group (torchrun / srun) if there is one; (rank, world size, device)."""
    place = launch_place()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{place.local_rank}" if cuda else "cpu")
    if place.world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                f"{place.world_size} processes but no MASTER_ADDR/MASTER_PORT: launch with torchrun, or export "
                "MASTER_ADDR (the first node) and MASTER_PORT in the srun job script"
            )
        os.environ.setdefault("RANK", str(place.rank))
        os.environ.setdefault("WORLD_SIZE", str(place.world_size))
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return place.rank, place.world_size, device


def run_in_process_group(func: Any, *args: Any) -> int:
    """Run a command; leave the process group it joined (torchrun/srun) when it returns."""
    joined_before = dist.is_available() and dist.is_initialized()
    try:
        return int(func(*args))
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
