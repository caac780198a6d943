"""The tiny CPU config shrunk further, so that a CLI run of a few steps costs about a second.

Every CLI test builds its arguments here: ``tiny_args(run_dir, demo_data, *extra, steps=...)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from tests.helpers import REPO

TINY_CONFIG = str(REPO / "experiments" / "tiny_cpu.yaml")

# A smaller network than the demo's.
SMALL_NET = [
    "--model.net.init_args.hidden_size=64",
    "--model.net.init_args.depth=2",
    "--model.net.init_args.num_heads=2",
    "--model.net.init_args.head.init_args.base_channels=8",
]


def small_net_config(folder: Path) -> Path:
    """:data:`SMALL_NET` as a YAML file in ``folder``, for commands that take ``--config`` files but no dotted
    overrides (``sample``)."""
    config: dict[str, Any] = {}
    for arg in SMALL_NET:
        dotted, value = arg.removeprefix("--").split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    path = folder / "small_net.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_args(
    run_dir: Path,
    data: dict,
    *extra: str,
    steps: int = 2,
    batch_size: int = 8,
    callbacks: list[dict[str, Any]] | None = None,
    log_every_n_steps: int = 1,
) -> list[str]:
    """``fit`` arguments: the tiny config on ``data`` (the demo dataset fixture), no validation, no bar.

    ``callbacks`` replaces the config's callbacks (None: no callbacks at all); ``extra`` comes last and wins.
    """
    return [
        "--config",
        TINY_CONFIG,
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        f"--trainer.log_every_n_steps={log_every_n_steps}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks={json.dumps(callbacks) if callbacks else 'null'}",
        f"--data.init_args.train_shards={data['train_shards']}",
        f"--data.init_args.val_shards={data['val_shards']}",
        f"--data.init_args.batch_size={batch_size}",
        *SMALL_NET,
        *extra,
    ]


def subprocess_env(threads: int | None = None) -> dict[str, str]:
    """Environment for a CLI subprocess: no inherited launcher variables (SLURM, torchrun), the repository
    importable (so that
    ``tests.helpers.*`` class paths resolve), ``threads`` OpenMP threads (default: this process's count, so
    that CPU kernels reduce in the same order as an in-process reference)."""
    drop = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DIP_RUN_TOKEN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["OMP_NUM_THREADS"] = str(threads if threads is not None else torch.get_num_threads())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# A high learning rate with a short EMA memory: EMA and raw weights differ clearly after 3 steps.
HIGH_LR = "--model.optimizer.init_args.lr=1e-2"


def ema_callback(**init_args: Any) -> dict[str, Any]:
    """The EMA callback as a YAML/JSON entry (decay 0.5 unless given)."""
    return {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.5, **init_args}}


def grid_callback(**init_args: Any) -> dict[str, Any]:
    return {"class_path": "dip_lightning.training.callbacks.SampleGrid", "init_args": init_args}


def fit_with(args: list[str], *callbacks: Any, ckpt_path: str | None = None) -> Any:
    """Build the CLI from ``args`` without running, add ``callbacks`` (probes), then ``fit``; returns the CLI."""
    from dip_lightning.training.cli import DiPCLI

    cli = DiPCLI(args=args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def read_png(path: Path) -> torch.Tensor:
    """A PNG as a uint8 (C, H, W) tensor."""
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1)


def fit_tiny(
    folder: Path, data: dict, *extra: str, steps: int = 2, batch_size: int = 8
) -> tuple[Any, list[float]]:
    """``fit`` of :func:`tiny_args` in ``folder / "run"``, in-process; returns the CLI and the per-step losses."""
    from lightning.pytorch.callbacks import Callback

    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses.append(float(outputs["loss"]))

    cli = fit_with(tiny_args(folder / "run", data, *extra, steps=steps, batch_size=batch_size), Record())
    return cli, losses
