"""``ShardDataModule``: class-conditional image batches from WebDataset shards, resumable to the batch.

Training batches are a pure function of ``(seed, rank, world_size, batch index)`` (:mod:`.streams`), not a
webdataset stream, so a requeued job continues with exactly the batch the interrupted one would have seen (edm2's
``InfiniteSampler(start_idx=...)``); the module's ``state_dict`` is the count of batches handed to the model. Batches
leave the workers as uint8 ``(B, 3, H, W)`` and become float32 ``[-1, 1]`` on the device
(:meth:`ShardDataModule.on_after_batch_transfer`). Validation is a finite pass in a fixed order, split evenly over
the ranks so no collective hangs. An unreadable sample is replaced within its batch, warned about and counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from dip_lightning.core.compat import batches_in_flight
from dip_lightning.core.data.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from dip_lightning.core.data.shards import expand_shards, read_class_names, shard_sample_counts
from dip_lightning.core.data.streams import (
    TrainShardStream,
    ValShardStream,
    count_samples,
    iter_image_batches,
    manifest_image_size,
)
from dip_lightning.core.distributed import rank_and_world
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.images import to_model_range

__all__ = ["ShardDataModule", "count_samples", "iter_image_batches", "IMAGENET_TRAIN_SIZE"]

IMAGENET_TRAIN_SIZE = 1_281_167

# Lightning warns about any IterableDataset with __len__ because workers might duplicate data; these
# streams assign batch ids to workers themselves, so the length is exact. Silence only that message.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined", category=UserWarning)


class PositionedDataLoader(DataLoader):
    """The training DataLoader; Lightning treats it as resumable (it has ``state_dict``).

    Its state is the data position kept by the DataModule, so Lightning's loop state and the
    DataModule's own checkpoint entry agree (and Lightning does not warn that a mid-epoch checkpoint
    cannot be resumed exactly).
    """

    datamodule: ShardDataModule | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self.datamodule.start_batch if self.datamodule is not None else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.datamodule is not None and "train_batches" in state_dict:
            self.datamodule.set_start_batch(int(state_dict["train_batches"]))

    def __iter__(self) -> Any:
        # Snapshot the start of this pass before any worker iterates: the main process keeps advancing
        # the cursor as batches are consumed, and a worker that starts late must not see those updates.
        stream = self.dataset
        if hasattr(stream, "pass_start"):
            stream.pass_start[0] = stream.cursor[0]
        return super().__iter__()


# ------------------------------------------------------------------------------------------ module
class ShardDataModule(pl.LightningDataModule):
    """Class-conditional image batches from WebDataset shards (see the module docstring).

    Args:
        train_shards: brace pattern(s) / glob(s) / list of local paths or URLs of training shards.
        val_shards: same for the validation / FID split (finite, deterministic pass).
        image_size: output resolution; images of another size get the ADM centre crop at load time.
        num_classes: label range ``[0, num_classes)``; a label outside it is a config error.
        batch_size: per-device training batch size.
        val_batch_size: per-device validation batch size (default ``batch_size``).
        num_workers: DataLoader worker processes (does not change the training stream).
        shuffle_buffer: samples mixed together; segments interleave ``round(shuffle_buffer / mean
            shard size)`` shards (at least one) and shuffle their union. 0 = one shard at a time.
        seed: stream seed; same config + same seed = same batches on every run.
        random_flip: horizontal flips (hashed from the sample position); the paper trains without.
        random_crop: the released code's ``random_crop`` for training: resize the shorter side to
            ``image_size`` (bilinear), a random window along the longer side, a horizontal flip (p = 1/2); the
            position and the flip are hashed from ``(seed, rank, sample position)``, so a resumed run sees the same
            crops. Off (default): the ADM centre crop, as the paper. It needs shards that keep the image's
            aspect ratio (``prepare --preprocess none``); on square shards at ``image_size`` only the flip is left.
        epoch_length: nominal samples per epoch over all ranks (progress bar / epoch bookkeeping);
            each rank yields ``epoch_length // (batch_size * world_size)`` batches per epoch.
        max_bad_fraction: stop with an error when more than this fraction of samples is unreadable (or missing
            from a shard that holds fewer samples than its manifest names).
        max_image_pixels: an image whose header declares more pixels is a bad sample, never decoded (the default
            passes every ImageNet image and refuses decompression bombs).
        max_image_bytes: an image member larger than this, or whose decoded size would be, is a bad sample.
        val_max_samples: use only the first N validation samples (e.g. a 10k FID subset).
        pin_memory: pin host memory (default: when CUDA is available).
        persistent_workers: keep workers alive between epochs (needs ``num_workers > 0``).
        prefetch_factor: batches prefetched per worker.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        image_size: int = 256,
        num_classes: int = 1000,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 5000,
        seed: int = 0,
        random_flip: bool = False,
        random_crop: bool = False,
        epoch_length: int = IMAGENET_TRAIN_SIZE,
        max_bad_fraction: float = 0.01,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
        val_max_samples: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("image_size", image_size, 8),
            ("num_classes", num_classes, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("seed", seed, 0),
            ("epoch_length", epoch_length, 1),
            ("prefetch_factor", prefetch_factor, 1),
            ("max_image_pixels", max_image_pixels, 1),
            ("max_image_bytes", max_image_bytes, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"ShardDataModule: {name} must be an integer >= {low}, got {value!r}")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ConfigError(f"ShardDataModule: val_batch_size must be >= 1, got {val_batch_size!r}")
        if val_max_samples is not None and (not isinstance(val_max_samples, int) or val_max_samples < 1):
            raise ConfigError(f"ShardDataModule: val_max_samples must be >= 1, got {val_max_samples!r}")
        if not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise ConfigError(
                f"ShardDataModule: max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}"
            )
        for name, value in (("train_shards", train_shards), ("val_shards", val_shards)):
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise ConfigError(f"ShardDataModule: {name} must be a pattern or a list, got {value!r}")
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.random_flip = random_flip
        self.random_crop = random_crop
        self.epoch_length = epoch_length
        self.max_bad_fraction = float(max_bad_fraction)
        self.limits = ImageLimits(max_image_pixels, max_image_bytes)
        self.val_max_samples = val_max_samples
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.class_names: list[str] | None = None
        self._train: TrainShardStream | None = None
        self._val: ValShardStream | None = None
        self._train_batches = 0  # training batches handed to the model, identical on every rank
        self._rank_world: tuple[int, int] | None = None
        self._logged_counts: tuple[int, int] | None = None

    # -- distributed context
    def _dist(self, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
        """``(rank, world size)``: each as given, else the trainer's, else the launch environment's."""
        if self.trainer is not None:
            r, w = self.trainer.global_rank, self.trainer.world_size
        else:
            r, w = rank_and_world()
        return (r if rank is None else rank), (w if world_size is None else world_size)

    # -- streams (public so tools and tests can build any rank's stream)
    def train_stream(self, rank: int | None = None, world_size: int | None = None) -> TrainShardStream:
        if self.train_shards is None:
            raise ConfigError("ShardDataModule: train_shards is not set")
        rank, world_size = self._dist(rank, world_size)
        urls = expand_shards(self.train_shards)
        mine = urls[rank::world_size] if len(urls) >= world_size else urls
        sizes = shard_sample_counts(mine)
        self._check_classes(urls)
        mean = max(1.0, sum(sizes) / max(1, len(sizes)))
        mix = max(1, round(self.shuffle_buffer / mean))
        per_rank = max(1, self.epoch_length // (self.batch_size * world_size))
        return TrainShardStream(
            mine,
            sizes,
            image_size=self.image_size,
            batch_size=self.batch_size,
            batches_per_epoch=per_rank,
            seed=self.seed,
            rank=rank,
            mix=mix,
            random_flip=self.random_flip,
            random_crop=self.random_crop,
            num_classes=self.num_classes,
            max_bad_fraction=self.max_bad_fraction,
            limits=self.limits,
        )

    def val_stream(self, rank: int | None = None, world_size: int | None = None) -> ValShardStream:
        if self.val_shards is None:
            raise ConfigError("ShardDataModule: val_shards is not set")
        rank, world_size = self._dist(rank, world_size)
        urls = expand_shards(self.val_shards)
        self._check_classes(urls)
        stream = ValShardStream(
            urls,
            shard_sample_counts(urls),
            image_size=self.image_size,
            batch_size=self.val_batch_size,
            rank=rank,
            world_size=world_size,
            max_samples=self.val_max_samples,
            num_classes=self.num_classes,
            max_bad_fraction=self.max_bad_fraction,
            limits=self.limits,
        )
        if stream.dropped and rank == 0:
            warnings.warn(
                f"validation: {stream.dropped} sample(s) left out so that {world_size} ranks get "
                f"{stream.samples_per_rank} each",
                stacklevel=2,
            )
        return stream

    def _check_classes(self, urls: Sequence[str]) -> None:
        names = read_class_names(urls)
        if names is not None:
            if len(names) > self.num_classes:
                raise ConfigError(
                    f"the shards have {len(names)} classes (classes.txt next to {urls[0]}) but num_classes="
                    f"{self.num_classes}: set model.net.init_args.num_classes={len(names)} (the data's class "
                    "count follows the model's)"
                )
            self.class_names = names

    # -- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        self._rank_world = self._dist()
        rank, world = self._rank_world
        if self.train_shards is not None and stage in (None, "fit") and self._train is None:
            self._train = self.train_stream(rank, world)
            self._train.seek(self._train_batches)
            size = manifest_image_size(self._train.urls)
            if size is not None and size != self.image_size and rank == 0:
                warnings.warn(
                    f"the training shards hold {size} px images but image_size={self.image_size}: "
                    "every image is cropped/resized at load time (slower)",
                    stacklevel=2,
                )
        if self.val_shards is not None and stage in (None, "fit", "validate") and self._val is None:
            self._val = self.val_stream(rank, world)

    def _loader(self, dataset: IterableDataset, cls: type[DataLoader] = DataLoader) -> DataLoader:
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": self.persistent_workers}
        # batch_size=None: the datasets yield whole batches (each worker builds its own batch ids).
        workers, pin = self.num_workers, self.pin_memory
        return cls(dataset, batch_size=None, num_workers=workers, pin_memory=pin, **extra)

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            self.setup("fit")
        if self._train is None:
            raise ConfigError("ShardDataModule: train_shards is not set")
        self._train.seek(self._train_batches)
        loader = self._loader(self._train, PositionedDataLoader)
        loader.datamodule = self
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_shards is None:
            return []  # Lightning skips validation for an empty list
        if self._val is None:
            self.setup("validate")
        assert self._val is not None
        return self._loader(self._val)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train is not None:
            self._train_batches += 1
            # The next pass of the loader (next epoch) starts after the last batch the model saw; the
            # workers of the running pass keep their own snapshot (`pass_start`).
            self._train.cursor[0] = self._train_batches
            self._log_counts(trainer)
        return to_model_range(images), labels

    def _log_counts(self, trainer: pl.Trainer) -> None:
        read, bad = self._counts()
        if self._logged_counts is not None and bad == self._logged_counts[1] and self._train_batches % 100:
            return
        self._logged_counts = (read, bad)
        if trainer.logger is not None:
            # Rank 0's counts (loggers are rank-zero only); data_metrics() gives every rank its own.
            trainer.logger.log_metrics(
                {"data/bad_samples": float(bad), "data/samples_read": float(read)}, step=trainer.global_step
            )

    def _counts(self) -> tuple[int, int]:
        """(samples read, bad samples) of the training stream in this rank, all workers together."""
        if self._train is None:
            return 0, 0
        read, bad = (int(v) for v in self._train.counters.sum(dim=0))
        return read, bad

    def data_metrics(self) -> dict[str, float]:
        """This rank's counts: training samples read and unreadable (bad) so far, and val bad samples."""
        read, bad = self._counts()
        val_bad = int(self._val.counters[:, 1].sum()) if self._val is not None else 0
        return {
            "data/samples_read": float(read),
            "data/bad_samples": float(bad),
            "data/val_bad_samples": float(val_bad),
        }

    # -- resume
    @property
    def start_batch(self) -> int:
        """Per-rank index of the first training batch not yet trained on (the resume position).

        Counts the batches handed to the model, minus one whose step has not finished: a checkpoint
        written in ``on_train_batch_start`` or from a signal handler inside the step holds weights
        without that batch, so the resumed run must see it again.
        """
        in_flight = 0
        trainer = self.trainer
        if trainer is not None and trainer.training:
            in_flight = batches_in_flight(trainer)
        return self._train_batches - in_flight

    def set_start_batch(self, batch: int) -> None:
        """Continue the training stream at per-rank batch ``batch`` (= optimizer steps x accumulation)."""
        if batch < 0:
            raise ConfigError(f"start batch must be >= 0, got {batch}")
        self._train_batches = int(batch)
        if self._train is not None:
            self._train.seek(self._train_batches)

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank_world or self._dist()
        return {
            "train_batches": self.start_batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": world,
            "shuffle_buffer": self.shuffle_buffer,
            "random_crop": self.random_crop,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _, world = self._rank_world or self._dist()
        now = {"seed": self.seed, "batch_size": self.batch_size, "world_size": world}
        now["shuffle_buffer"] = self.shuffle_buffer
        now["random_crop"] = self.random_crop
        changed = {k: (state_dict.get(k), v) for k, v in now.items() if state_dict.get(k, v) != v}
        if changed:
            warnings.warn(
                f"resuming the data stream with changed settings (checkpoint, now): {changed}; it "
                "continues at the same batch index but is not the stream the run would have seen",
                stacklevel=2,
            )
        self.set_start_batch(int(state_dict.get("train_batches", 0)))
