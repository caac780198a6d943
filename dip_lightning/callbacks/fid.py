"""In-training FID: generate class-balanced samples on all ranks every N steps and log ``val/fid``.

Design points, and why:

* The torchmetrics ``FrechetInceptionDistance`` and its feature network live here, not in the LightningModule,
  so EMA never averages Inception's weights, checkpoints never carry 95 MB of frozen network and 64 MB of
  float64 states, and ``load_from_checkpoint`` does not need the extractor.
* Work is spread over ranks: global sample ``i`` has label ``i % num_classes`` and seed ``seed + i``, and each
  rank generates a contiguous slice of the indices. The set of images is therefore the same for any world size
  and any batch size (the module's noise depends only on the seed).
* ``compute()`` is a collective (one gather of fixed-size float64 sums) and runs on every rank; only rank 0
  writes to the loggers and to ``fid.csv``.
* Reference statistics from a file are loaded into the metric's real states on global rank 0 only (zeros
  elsewhere), so the cross-rank sum counts them once; see `dip_lightning.fid.set_reference_stats`. The real
  states survive ``reset()`` (``reset_real_features=False``); fake states are reset after every evaluation.
* Logging goes straight to ``trainer.loggers`` with ``step=global_step``. ``pl_module.log`` from
  ``on_train_batch_end`` would be flushed to the loggers only on steps that are multiples of
  ``log_every_n_steps``, so an FID computed on another step would silently never reach TensorBoard. The value
  is also put into ``trainer.callback_metrics["val/fid"]`` for checkpoint monitors and the progress bar.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dip_lightning.callbacks.ema import sampling_module
from dip_lightning.fid import (
    FIDHelperInception,
    FIDStats,
    iter_shard_images,
    load_stats,
    metric_real_stats,
    save_stats,
    set_reference_stats,
)
from dip_lightning.images import to_uint8
from dip_lightning.run_folder import artefact_dir
from dip_lightning.seeding import sample_labels_and_seeds

METRIC_NAME = "val/fid"


class FIDCallback(pl.Callback):
    """Periodic FID of generated samples against reference statistics (or real shards).

    Args:
        every_n_steps: evaluate when ``global_step`` (optimizer steps) is a multiple of this.
        num_samples: generated images per evaluation, over all ranks (class-balanced: ``i % num_classes``).
        batch_size: images generated per ``generate`` call on each rank.
        reference: statistics npz from ``python -m dip_lightning fid-stats`` (or an ADM reference batch). It
            must come from the same extractor; a mismatch recorded in the file is an error.
        real_shards: alternative to ``reference``: compute real statistics from these WebDataset shards at the
            first evaluation (spread over ranks).
        real_num_samples: how many real images to use with ``real_shards`` (default: ``num_samples``).
        real_image_size: size real images are ADM-cropped to (default: the module's ``image_shape[-1]``).
        real_cache: where to save the statistics computed from ``real_shards``; later runs load the file
            instead of recomputing.
        extractor: the feature network (YAML ``class_path``), default `dip_lightning.fid.FIDHelperInception`.
        use_ema: sample with the EMA weights when an EMA callback has them.
        seed: seed of global sample 0; sample ``i`` uses ``seed + i``.
        on_train_end: also evaluate at the end of training (unless the last step was just evaluated).
        num_steps, cfg_scale, cfg_interval: sampler overrides for ``generate`` (None keeps the module's).
        csv_name: file in the run's artefact folder (:func:`dip_lightning.run_folder.artefact_dir`) that gets
            one ``step,fid,...`` row per evaluation.
        metric_name: key for the loggers and ``callback_metrics``; give each FID callback its own when
            several run side by side (e.g. ``val/fid_cfg``).
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 32,
        reference: str | None = None,
        real_shards: str | None = None,
        real_num_samples: int | None = None,
        real_image_size: int | None = None,
        real_cache: str | None = None,
        extractor: nn.Module | None = None,
        use_ema: bool = True,
        seed: int = 0,
        on_train_end: bool = True,
        num_steps: int | None = None,
        cfg_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        csv_name: str = "fid.csv",
        metric_name: str = METRIC_NAME,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 2:
            raise ValueError(f"FID needs at least 2 samples, got num_samples={num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (reference is None) == (real_shards is None):
            raise ValueError(
                "FIDCallback needs exactly one of `reference` (statistics npz from "
                "`python -m dip_lightning fid-stats --shards ... --out ref.npz`) or `real_shards`"
            )
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.reference = reference
        self.real_shards = real_shards
        self.real_num_samples = real_num_samples if real_num_samples is not None else num_samples
        self.real_image_size = real_image_size
        self.real_cache = real_cache
        self.extractor = extractor
        self.use_ema = use_ema
        self.seed = seed
        self.eval_on_train_end = on_train_end
        overrides = {"num_steps": num_steps, "cfg_scale": cfg_scale, "cfg_interval": cfg_interval}
        self.sampler_overrides = {k: v for k, v in overrides.items() if v is not None}
        self.csv_name = csv_name
        self.metric_name = metric_name
        #: (global_step, fid) of every evaluation of this run (and of resumed runs, via the checkpoint).
        self.history: list[tuple[int, float]] = []
        self._metric: Any = None
        self._real_loaded = False
        self._last_eval_step = -1

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Fail at start-up, not after hours of training, when a file is missing.
        if self.reference is not None and not Path(self.reference).is_file():
            load_stats(self.reference)  # raises FileNotFoundError with the fid-stats command to run
        if self.extractor is None:
            self.extractor = FIDHelperInception()
        if not hasattr(pl_module, "generate") or not hasattr(pl_module, "num_classes"):
            raise TypeError(
                "FIDCallback needs a LightningModule with `generate(labels, seeds)` and `num_classes`"
            )

    def _get_metric(self, device: torch.device) -> Any:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self._metric is None:
            if self.extractor is None:
                self.extractor = FIDHelperInception()
            metric = FrechetInceptionDistance(
                feature=self.extractor, reset_real_features=False, normalize=False
            )
            # compute() casts to the dtype of the last features; a rank that generated nothing has none.
            metric.orig_dtype = torch.float64
            self._metric = metric
        self._metric = self._metric.to(device)
        return self._metric

    @property
    def extractor_name(self) -> str:
        return str(getattr(self.extractor, "name", type(self.extractor).__name__))

    def _load_real(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metric: Any) -> None:
        """Fill the real states once: from the reference file, the cache, or by streaming real shards."""
        if self._real_loaded:
            return
        path = self.reference
        if path is None and self.real_cache is not None and Path(self.real_cache).is_file():
            path = self.real_cache
        if path is not None:
            stats = load_stats(path)
            if stats.extractor and stats.extractor != self.extractor_name:
                raise ValueError(
                    f"{path} was computed with extractor {stats.extractor!r} but this callback uses "
                    f"{self.extractor_name!r}; recompute it with that extractor (fid-stats --extractor ...)"
                )
            if not stats.extractor:
                rank_zero_warn(
                    f"{path} records no extractor (an ADM reference batch?): it is only comparable if it was "
                    f"made with the same network and resize as {self.extractor_name}"
                )
            set_reference_stats(metric, stats, global_rank=trainer.global_rank)
            rank_zero_info(
                f"FID: loaded reference statistics of {stats.num_samples or '?'} images from {path}"
            )
        else:
            assert self.real_shards is not None
            size = self.real_image_size or int(pl_module.image_shape[-1])
            start = time.perf_counter()
            for images in iter_shard_images(
                self.real_shards,
                self.batch_size,
                image_size=size,
                limit=self.real_num_samples,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            ):
                metric.update(images.to(metric.device), real=True)
            stats: FIDStats = metric_real_stats(metric, self.extractor_name)  # collective
            rank_zero_info(
                f"FID: real statistics from {stats.num_samples} images of {self.real_shards} "
                f"({time.perf_counter() - start:.0f} s)"
            )
            if stats.num_samples < self.real_num_samples:
                rank_zero_info(f"FID: the shards hold only {stats.num_samples} images")
            if self.real_cache is not None and trainer.global_rank == 0:
                try:
                    save_stats(self.real_cache, stats, overwrite=False)
                except FileExistsError:  # another run wrote it meanwhile; never replace reference stats
                    rank_zero_warn(f"FID: {self.real_cache} appeared meanwhile; left unchanged")
        self._real_loaded = True

    # ------------------------------------------------------------------------------------------ evaluation
    def _indices(self, rank: int, world_size: int) -> torch.Tensor:
        """This rank's contiguous share of the global sample indices ``0 .. num_samples - 1``."""
        return torch.arange(self.num_samples).tensor_split(world_size)[rank]

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Generate this rank's samples, reduce over ranks and return the FID (call on every rank)."""
        start = time.perf_counter()
        module = sampling_module(trainer, pl_module, self.use_ema)
        device = pl_module.device
        metric = self._get_metric(device)
        self._load_real(trainer, pl_module, metric)
        num_classes = int(module.num_classes)
        for chunk in self._indices(trainer.global_rank, trainer.world_size).split(self.batch_size):
            labels, seeds = sample_labels_and_seeds(chunk.numpy(), num_classes, self.seed)
            images = module.generate(
                torch.from_numpy(labels), torch.from_numpy(seeds), **self.sampler_overrides
            )
            # .to(device): an EMA copy kept on another device (EMA(device="cpu")) returns images there.
            metric.update(to_uint8(images).to(device), real=False)
        fid = float(metric.compute())  # collective: every rank
        metric.reset()  # fake states only (reset_real_features=False)
        step = trainer.global_step
        self._last_eval_step = step
        self.history.append((step, fid))
        self._report(trainer, step, fid, time.perf_counter() - start)
        return fid

    def _report(self, trainer: pl.Trainer, step: int, fid: float, seconds: float) -> None:
        trainer.callback_metrics[self.metric_name] = torch.tensor(fid, dtype=torch.float64)
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics({self.metric_name: fid}, step=step)
        path = artefact_dir(trainer) / self.csv_name
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "fid", "num_samples", "extractor", "seconds", "unix_time"])
            row = [
                step,
                f"{fid:.6f}",
                self.num_samples,
                self.extractor_name,
                f"{seconds:.1f}",
                int(time.time()),
            ]
            writer.writerow(row)
        rank_zero_info(
            f"{self.metric_name} at step {step}: {fid:.4f} ({self.num_samples} samples, {seconds:.0f} s)"
        )

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs several times per optimizer step: evaluate once.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_eval_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.eval_on_train_end and trainer.global_step > 0 and trainer.global_step != self._last_eval_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # Several FID callbacks may run side by side (EMA and raw weights, two guidance scales); each needs
        # its own checkpoint slot, so the key carries what tells them apart.
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            num_samples=self.num_samples,
            use_ema=self.use_ema,
            seed=self.seed,
            csv_name=self.csv_name,
            metric_name=self.metric_name,
            **self.sampler_overrides,
        )

    def state_dict(self) -> dict[str, Any]:
        # Bookkeeping only: the metric (network and statistics) is rebuilt from the config, not checkpointed.
        return {"history": [list(h) for h in self.history], "last_eval_step": self._last_eval_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self._last_eval_step = int(state_dict.get("last_eval_step", -1))


__all__ = ["FIDCallback", "METRIC_NAME"]
