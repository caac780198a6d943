"""``FIDCallback``: the FID-only spelling of `dip_lightning.callbacks.metrics.MetricsCallback`.

Kept so that experiment YAMLs and scripts written for it keep working; it is `MetricsCallback` with
``metrics=["fid"]`` and the FID logged under ``metric_name`` (default ``val/fid``). ``history`` lists
``(step, fid)`` pairs as before. It writes ``eval_metrics.csv`` like `MetricsCallback` (runs made before the
metrics engine have ``fid.csv`` with the header ``step,fid,num_samples,extractor,seconds,unix_time``).
"""

from __future__ import annotations

from torch import nn

from dip_lightning.callbacks.metrics import CSV_NAME, MetricsCallback

METRIC_NAME = "val/fid"

__all__ = ["FIDCallback", "METRIC_NAME"]


class FIDCallback(MetricsCallback):
    """Periodic FID of generated samples (see `MetricsCallback` for every argument but these).

    Args:
        metric_name: key for the loggers and ``callback_metrics``; give each FID callback its own when several
            run side by side (e.g. ``val/fid_cfg``).
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
        csv_name: str = CSV_NAME,
        metric_name: str = METRIC_NAME,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            num_samples=num_samples,
            batch_size=batch_size,
            reference=reference,
            real_shards=real_shards,
            real_num_samples=real_num_samples,
            real_image_size=real_image_size,
            real_cache=real_cache,
            metrics=["fid"],
            extractor=extractor,  # type: ignore[arg-type]
            use_ema=use_ema,
            seed=seed,
            on_train_end=on_train_end,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
            cfg_interval=cfg_interval,
            csv_name=csv_name,
            cache_dir=cache_dir,
        )
        self.metric_name = metric_name

    def log_key(self, metric: str) -> str:
        return self.metric_name if metric == "fid" else super().log_key(metric)

    @property
    def history(self) -> list[tuple[int, float]]:
        """``(global_step, fid)`` of every evaluation."""
        return [(step, float(r["fid"])) for step, r in self.results if r.get("fid") is not None]

    @property
    def state_key(self) -> str:
        # The key FIDCallback had before the metrics engine (csv_name was fid.csv), so older checkpoints resume.
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            num_samples=self.num_samples,
            use_ema=self.use_ema,
            seed=self.seed,
            csv_name="fid.csv" if self.csv_name == CSV_NAME else self.csv_name,
            metric_name=self.metric_name,
            **self.sampler_overrides,
        )
