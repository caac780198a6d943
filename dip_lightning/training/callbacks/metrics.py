"""In-training evaluation: every N steps, generate class-balanced samples on all ranks and log the metrics suite.

The metrics are those of ``evaluate`` (:class:`~dip_lightning.core.metrics.MetricEngine`), so a number logged in
training and one from the command agree. The feature networks live in the callback, not in the LightningModule, so
EMA never averages them and checkpoints never carry them. The sample set does not depend on the world size; values
go to the loggers at ``global_step`` and, from rank 0, to ``eval_metrics.csv`` in the log folder (docs/design.md).
As a :class:`~dip_lightning.training.callbacks.evaluation.StepEvaluation` the step is saved before it is evaluated,
and a signal stops the evaluation between two batches of samples.
"""

from __future__ import annotations

import csv
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dip_lightning.checkpoint.run_folder import EVAL_METRICS_CSV, artefact_dir
from dip_lightning.core.diffusion import check_guide, sampler_overrides
from dip_lightning.core.distributed import is_distributed
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.images import to_uint8
from dip_lightning.core.metrics import METRIC_NAMES, MetricEngine, check_metric_names
from dip_lightning.core.metrics.features import DINOv2Features, FeatureExtractor
from dip_lightning.core.metrics.reference import (
    MetricUnavailableWarning,
    check_reference_file,
    extract_feature_set,
    gather_feature_set,
    reference_from_features,
    save_reference,
)
from dip_lightning.core.metrics.sources import iter_shard_images
from dip_lightning.core.seeding import sample_labels_and_seeds
from dip_lightning.training.callbacks.ema import sampling_module
from dip_lightning.training.callbacks.evaluation import StepEvaluation, stop_if_signalled
from dip_lightning.training.callbacks.monitor import images_seen as images_seen_so_far

#: What `MetricsCallback` computes by default: every metric of the engine but FD-DINOv2, which needs weights.
DEFAULT_TRAINING_METRICS = tuple(m for m in METRIC_NAMES if m != "fd_dinov2")

__all__ = ["DEFAULT_TRAINING_METRICS", "MetricsCallback"]


class MetricsCallback(StepEvaluation):
    """Periodic evaluation of generated samples with the metrics engine; logs ``val/<metric>``.

    Args:
        every_n_steps: evaluate when ``global_step`` (optimizer steps) is a multiple of this.
        num_samples: generated images per evaluation, over all ranks (class-balanced: ``i % num_classes``).
        batch_size: images generated per ``generate`` call on each rank.
        reference: image npz, ADM reference batch or ``fid-stats`` file (whose recorded extractor must match).
        real_shards: instead of ``reference``: real WebDataset shards, read at the first evaluation.
        real_num_samples: how many real images to use with ``real_shards`` (default: ``num_samples``).
        real_image_size: size real images are ADM-cropped to (default: the module's ``image_shape[-1]``).
        real_cache: kit reference file to save the ``real_shards`` reference to; later runs load it instead.
        metrics: ``METRIC_NAMES`` to compute (default ``DEFAULT_TRAINING_METRICS``); an unusable one is logged absent.
        extractor: the Inception network (YAML ``class_path``; default ``FIDHelperInception``).
        dinov2_weights: local ``dinov2_vitl14_pretrain.pth`` for ``fd_dinov2`` (default ``$DIP_DINOV2_WEIGHTS``).
        patch_size: grid of the patch-seam score (default: the module's ``net.patch_size``).
        use_ema: sample with the EMA weights when an EMA callback has them.
        seed: seed of global sample 0; sample ``i`` uses ``seed + i``.
        on_train_end: also evaluate at the end of training (unless the last step was just evaluated).
        num_steps: sampler override for ``generate`` (None keeps the module's).
        cfg_scale: sampler override for ``generate`` (None keeps the module's).
        cfg_interval: sampler override for ``generate`` (None keeps the module's).
        guide: autoguidance: a guide network in place of the unconditional branch, ``cfg_scale`` its weight
            (YAML ``class_path: dip_lightning.training.autoguidance.Guide`` with ``init_args: {path: ...}``);
            checked against the model at setup.
        csv_name: file in the run's artefact folder (:func:`~dip_lightning.checkpoint.run_folder.artefact_dir`).
        prefix: logger key prefix (``<prefix><metric>``); each of several side-by-side callbacks needs its own.
        cache_dir: reference feature cache (default ``$DIP_METRICS_CACHE`` or ``~/.cache/dip_lightning/metrics``).
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
        metrics: Sequence[str] | None = None,
        extractor: FeatureExtractor | None = None,
        dinov2_weights: str | None = None,
        patch_size: int | None = None,
        use_ema: bool = True,
        seed: int = 0,
        on_train_end: bool = True,
        num_steps: int | None = None,
        cfg_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
        guide: torch.nn.Module | None = None,
        csv_name: str = EVAL_METRICS_CSV,
        prefix: str = "val/",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self._check_options(every_n_steps, num_samples, batch_size, reference, real_shards)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.reference = reference
        self.real_shards = real_shards
        self.real_num_samples = real_num_samples if real_num_samples is not None else num_samples
        self.real_image_size = real_image_size
        self.real_cache = real_cache
        self.metrics = check_metric_names(metrics if metrics is not None else DEFAULT_TRAINING_METRICS)
        self.extractor = extractor
        self.dinov2_weights = dinov2_weights
        self.patch_size = patch_size
        self.use_ema = use_ema
        self.seed = seed
        self.eval_on_train_end = on_train_end
        self.sampler_overrides = sampler_overrides(
            num_steps=num_steps, cfg_scale=cfg_scale, cfg_interval=cfg_interval
        )
        self.guide = guide
        self.csv_name = csv_name
        self.prefix = prefix
        self.cache_dir = cache_dir
        #: (global_step, {metric: value}) of every evaluation of this run (and of resumed runs).
        self.results: list[tuple[int, dict[str, float | None]]] = []
        self._engine: MetricEngine | None = None
        self._last_eval_step = -1
        self._batch_size: int | None = None  # this rank's micro-batch, seen in on_train_batch_end

    def _check_options(
        self,
        every_n_steps: int,
        num_samples: int,
        batch_size: int,
        reference: str | None,
        real_shards: str | None,
    ) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 2:
            raise ConfigError(f"the metrics need at least 2 samples, got num_samples={num_samples}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if (reference is None) == (real_shards is None):
            raise ConfigError(
                f"{type(self).__name__} needs exactly one of `reference` (an image npz, an ADM reference batch "
                "or `python -m dip_lightning fid-stats --shards ... --out ref.npz`) or `real_shards`"
            )

    # ------------------------------------------------------------------------------------------ names
    def log_key(self, metric: str) -> str:
        """The logger / ``callback_metrics`` key of ``metric``."""
        return f"{self.prefix}{metric}"

    @property
    def extractor_name(self) -> str:
        return str(getattr(self.extractor, "name", type(self.extractor).__name__))

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # Fail at start-up, not after hours of training, when a file is missing.
        if self.reference is not None and not Path(self.reference).is_file():
            raise FileNotFoundError(
                f"{type(self).__name__}: reference {self.reference} not found; create it with "
                f"`python -m dip_lightning fid-stats --shards '<real shards>' --out {self.reference}` "
                "(or pass an image npz)"
            )
        if self.reference is not None:
            check_reference_file(self.reference)  # a damaged one (NaN statistics) too
        if not hasattr(pl_module, "generate") or not hasattr(pl_module, "num_classes"):
            raise TypeError(
                f"{type(self).__name__} needs a LightningModule with `generate(labels, seeds)` and `num_classes`"
            )
        if self.guide is not None:
            check_guide(pl_module, self.guide)
        if self.extractor is None and set(self.metrics) - {"patch_seam", "fd_dinov2"}:
            from dip_lightning.core.metrics.features import FIDHelperInception

            self.extractor = FIDHelperInception()

    def _patch_size(self, pl_module: pl.LightningModule) -> int | None:
        if self.patch_size is not None:
            return self.patch_size
        size = getattr(getattr(pl_module, "net", None), "patch_size", None)
        return int(size) if size is not None else None

    def _get_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MetricEngine:
        """Networks and reference, built once at the first evaluation (collective: every rank)."""
        if self._engine is not None:
            return self._engine
        device = pl_module.device
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MetricUnavailableWarning)
            reference: Any = self.reference
            if reference is None and self.real_cache is not None and Path(self.real_cache).is_file():
                reference = self.real_cache
            if reference is None:
                reference = self._reference_from_shards(trainer, pl_module, device)
            self._engine = MetricEngine.create(
                reference,
                self.metrics,
                self._patch_size(pl_module),
                device,
                self.batch_size,
                extractor=self.extractor,
                dinov2_weights=self.dinov2_weights,
                cache_dir=self.cache_dir,
            )
        for warning in caught:
            rank_zero_warn(f"{type(self).__name__}: {warning.message}")
        ref = self._engine.reference
        rank_zero_info(
            f"{type(self).__name__}: reference {ref.path} ({ref.layout}, {ref.num_images or '?'} images); "
            f"metrics {', '.join(self._engine.usable)}"
        )
        return self._engine

    def _reference_from_shards(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, device: torch.device
    ) -> Any:
        assert self.real_shards is not None
        size = self.real_image_size or int(pl_module.image_shape[-1])
        kinds = {"pool", "seam"}
        if self.extractor is not None:
            kinds |= {"spatial"} & self.extractor.available()
        dinov2 = None
        if "fd_dinov2" in self.metrics and self.dinov2_weights:
            dinov2 = DINOv2Features(self.dinov2_weights).to(device)
            kinds.add("dinov2")
        start = time.perf_counter()
        batches = iter_shard_images(
            self.real_shards,
            self.batch_size,
            image_size=size,
            limit=self.real_num_samples,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            labelled=True,
        )
        extractor = self.extractor.to(device) if self.extractor is not None else None
        features = gather_feature_set(extract_feature_set(batches, kinds, extractor, device, dinov2))
        rank_zero_info(
            f"{type(self).__name__}: reference features of {features.num_images} images of {self.real_shards} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        if features.num_images < self.real_num_samples:
            rank_zero_info(f"{type(self).__name__}: the shards hold only {features.num_images} images")
        dinov2_name = getattr(dinov2, "name", "")
        if self.real_cache is not None and trainer.global_rank == 0:
            try:
                save_reference(self.real_cache, features, overwrite=False, dinov2_name=dinov2_name)
            except FileExistsError:  # another run wrote it meanwhile; never replace a reference
                rank_zero_warn(f"{type(self).__name__}: {self.real_cache} appeared meanwhile; left unchanged")
        return reference_from_features(features, str(self.real_shards), dinov2_name)

    # ------------------------------------------------------------------------------------------ evaluation
    def _indices(self, rank: int, world_size: int) -> torch.Tensor:
        """This rank's contiguous share of the global sample indices ``0 .. num_samples - 1``."""
        return torch.arange(self.num_samples).tensor_split(world_size)[rank]

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float | None]:
        """Generate this rank's samples, gather features over ranks and return the metrics (call on every rank)."""
        start = time.perf_counter()
        engine = self._get_engine(trainer, pl_module)
        module = sampling_module(trainer, pl_module, self.use_ema)
        num_classes = int(module.num_classes)
        device = engine.device

        chunks = self._indices(trainer.global_rank, trainer.world_size).split(self.batch_size)
        # Rank 0 holds the largest share: every rank goes through as many rounds, so that the signal checks (a
        # collective in DDP) pair up even where a rank has one batch less.
        rounds = -(-len(self._indices(0, trainer.world_size)) // self.batch_size)

        def batches() -> Any:
            for i in range(rounds):
                stop_if_signalled(trainer)
                if i >= len(chunks):
                    continue
                labels, seeds = sample_labels_and_seeds(chunks[i].numpy(), num_classes, self.seed)
                images = module.generate(
                    torch.from_numpy(labels),
                    torch.from_numpy(seeds),
                    guide=self.guide,
                    **self.sampler_overrides,
                )
                # .to(device): an EMA copy kept on another device (EMA(device="cpu")) returns images there.
                yield to_uint8(images).to(device), labels

        samples = gather_feature_set(engine.features(batches()))  # collective
        results = engine.evaluate(samples) if trainer.global_rank == 0 else {}
        if is_distributed():
            box = [results]
            dist.broadcast_object_list(box, src=0)
            results = box[0]
        step = trainer.global_step
        self._last_eval_step = step
        self.results.append((step, dict(results)))
        self._report(trainer, step, results, time.perf_counter() - start)
        return results

    def _report(
        self, trainer: pl.Trainer, step: int, results: dict[str, float | None], seconds: float
    ) -> None:
        present = {m: v for m, v in results.items() if v is not None}
        for metric, value in present.items():
            trainer.callback_metrics[self.log_key(metric)] = torch.tensor(value, dtype=torch.float64)
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics({self.log_key(m): v for m, v in present.items()}, step=step)
        path = artefact_dir(trainer) / self.csv_name
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = [m for m in METRIC_NAMES if m in self.metrics]
        new = not path.exists()
        images_seen = images_seen_so_far(trainer, self._batch_size)  # the run's one count (monitor.py)
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "images_seen", *columns, "num_samples", "seconds", "unix_time"])
            values = [repr(float(results[m])) if results.get(m) is not None else "" for m in columns]
            writer.writerow(
                [
                    step,
                    images_seen if images_seen is not None else "",
                    *values,
                    self.num_samples,
                    f"{seconds:.1f}",
                ]
                + [int(time.time())]
            )
        shown = ", ".join(f"{m} {v:.4g}" for m, v in present.items())
        rank_zero_info(
            f"{type(self).__name__} at step {step}: {shown} ({self.num_samples} samples, {seconds:.0f} s)"
        )

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if isinstance(first, torch.Tensor) and first.ndim > 0:
            self._batch_size = int(first.shape[0])
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def due_at_step(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        # With gradient accumulation this hook runs several times per optimizer step: evaluate once.
        return step > 0 and step % self.every_n_steps == 0 and step != self._last_eval_step

    def due_at_end(self, trainer: pl.Trainer) -> bool:
        return (
            self.eval_on_train_end and trainer.global_step > 0 and trainer.global_step != self._last_eval_step
        )

    def evaluate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def logged_keys(self) -> set[str]:
        return {self.log_key(m) for m in self.metrics}

    # ------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        # Several metric callbacks may run side by side (EMA and raw weights, two guidance scales); each needs
        # its own checkpoint slot, so the key carries what tells them apart.
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            num_samples=self.num_samples,
            use_ema=self.use_ema,
            seed=self.seed,
            csv_name=self.csv_name,
            prefix=self.prefix,
            **self.sampler_overrides,
            **({"guide": repr(self.guide)} if self.guide is not None else {}),
        )

    def state_dict(self) -> dict[str, Any]:
        # Bookkeeping only: networks and reference are rebuilt from the config, not checkpointed.
        return {"results": [[s, dict(r)] for s, r in self.results], "last_eval_step": self._last_eval_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = [(int(s), {k: _opt_float(v) for k, v in r.items()}) for s, r in state_dict["results"]]
        self._last_eval_step = int(state_dict["last_eval_step"])


def _opt_float(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)
