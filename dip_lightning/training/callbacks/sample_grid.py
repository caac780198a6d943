"""Sample grids during training: the same noise and classes every time, so progress is visible at a glance.

Every ``every_n_steps`` optimizer steps the callback generates ``rows x cols`` images (row r = class ``classes[r]``,
column c = seed ``seed + r * cols + c``) with the EMA weights (``use_ema``), writes
``<run>/tensorboard/grids/step_XXXXXXXX.png`` with a JSON side file that records each row's class, whatever the
logger, and logs the grid to every logger that takes images (TensorBoard, W&B, MLflow:
:func:`~dip_lightning.training.loggers.log_image`).
Only global rank 0 generates (a grid is a handful of images, one batch). As a
:class:`~dip_lightning.training.callbacks.evaluation.StepEvaluation` the step is saved before its grid, and a signal
is acted on before and after the grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from dip_lightning.checkpoint.run_folder import GRID_FOLDER, artefact_dir
from dip_lightning.core.diffusion import check_guide, sampler_overrides
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.images import to_uint8
from dip_lightning.training.callbacks.ema import sampling_module
from dip_lightning.training.callbacks.evaluation import StepEvaluation
from dip_lightning.training.loggers import log_image


def make_grid(images: torch.Tensor, cols: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """Tile uint8 images (N, C, H, W) into one (C, rows*(H+p)+p, cols*(W+p)+p) image, row-major."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value, dtype=images.dtype
    )
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


class SampleGrid(StepEvaluation):
    """Periodic sample grids from fixed noise and a fixed list of classes.

    Args:
        every_n_steps: generate a grid every N optimizer steps (and at the end of training when ``on_train_end``).
        classes: class index of each row; default: ``rows`` classes spread evenly over the label space.
        rows: number of rows when ``classes`` is not given.
        cols: images per row (one seed each).
        seed: base seed of the fixed noise.
        use_ema: sample with the EMA weights when an EMA callback is active (else the raw weights).
        num_steps: sampler steps for the grid (cheap by default); None = the module's sampler setting.
        cfg_scale: guidance scale for the grid; None = the module's sampler setting.
        cfg_interval: guidance interval ``(t_min, t_max)`` for the grid; None = the module's sampler setting.
        guide: autoguidance: a guide network in place of the unconditional branch, ``cfg_scale`` its weight
            (YAML ``class_path: dip_lightning.training.autoguidance.Guide``); checked against the model at setup.
        upscale: nearest-neighbour upscaling of the PNG so that tiny images stay visible.
        on_train_end: also write a grid when training ends.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        classes: list[int] | None = None,
        rows: int = 4,
        cols: int = 8,
        seed: int = 0,
        use_ema: bool = True,
        num_steps: int | None = 50,
        cfg_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        guide: torch.nn.Module | None = None,
        upscale: int = 1,
        on_train_end: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"SampleGrid.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.classes = classes
        self.rows = rows
        self.cols = cols
        self.seed = seed
        self.use_ema = use_ema
        self.sampler_overrides = sampler_overrides(
            num_steps=num_steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval
        )
        self.guide = guide
        self.upscale = upscale
        self.write_on_train_end = on_train_end
        self.last_written: Path | None = None
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # A guide that does not fit fails now, not at the first grid.
        if self.guide is not None and stage == "fit":
            check_guide(pl_module, self.guide)

    def row_classes(self, num_classes: int) -> list[int]:
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < num_classes]
            if bad:
                raise ConfigError(f"SampleGrid.classes {bad} are outside [0, {num_classes}).")
            return list(self.classes)
        return [int(r * num_classes / self.rows) for r in range(self.rows)]

    @torch.no_grad()
    def generate_grid(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[torch.Tensor, list[int]]:
        """The grid as uint8 (C, H, W) and the class of each row."""
        module = sampling_module(trainer, pl_module, self.use_ema)
        classes = self.row_classes(module.num_classes)
        labels = torch.tensor([c for c in classes for _ in range(self.cols)], dtype=torch.long)
        seeds = torch.arange(len(labels), dtype=torch.long) + self.seed
        images = module.generate(labels, seeds, guide=self.guide, **self.sampler_overrides)
        grid = make_grid(to_uint8(images).cpu(), cols=self.cols)
        return grid, classes

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        step = trainer.global_step
        if step == self._last_step:
            return self.last_written
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        grid, classes = self.generate_grid(trainer, pl_module)
        out_dir = artefact_dir(trainer) / GRID_FOLDER
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:08d}.png"
        array = grid.permute(1, 2, 0).numpy()
        if self.upscale > 1:
            array = np.repeat(np.repeat(array, self.upscale, axis=0), self.upscale, axis=1)
        Image.fromarray(array).save(path)
        meta = {
            "step": step,
            "row_classes": classes,
            "cols": self.cols,
            "seed": self.seed,
            "use_ema": self.use_ema,
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        log_image(trainer.loggers, "samples/grid", grid, step, caption=f"row classes: {classes}")
        self.last_written = path
        return path

    def due_at_step(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0 and step != self._last_step

    def due_at_end(self, trainer: pl.Trainer) -> bool:
        return self.write_on_train_end and trainer.global_step != self._last_step

    def evaluate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module)
