"""MetricsCallback inside real Lightning runs: schedule, logging,
eval_metrics.csv, reproducibility, EMA, real shards, exact resume state, DDP, and agreement with `evaluate`.

The LightningModule here is a tiny generator with the project's sampling API (``generate(labels, seeds,
**overrides)``, ``num_classes``, ``image_shape``); the feature network is `PixelProjection`, so a whole fit
with several evaluations takes seconds on one core.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dip_lightning.checkpoint.run_folder import log_dir
from dip_lightning.core.metrics import compute_metrics
from dip_lightning.core.metrics.features import PixelProjection
from dip_lightning.core.metrics.frechet import FIDStats, frechet_distance
from dip_lightning.core.metrics.patch_seam import SeamProfile
from dip_lightning.core.metrics.reference import (
    FeatureSet,
    Reference,
    _npz_keys,
    _read_stats_file,
    save_reference,
)
from dip_lightning.training.callbacks.ema import EMA
from dip_lightning.training.callbacks.metrics import MetricsCallback
from dip_lightning.training.callbacks.monitor import TrainingMonitor

torch.set_num_threads(1)
SIZE = 16


class ToyGenerator(pl.LightningModule):
    """Images are a function of (label, seed) and one trained parameter, like DiPModule.generate."""

    num_classes = 3
    image_shape = (3, SIZE, SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.3))
        self.register_buffer(
            "class_colour", torch.tensor([[0.4, -0.2, 0.0], [-0.3, 0.3, 0.1], [0.0, 0.0, -0.4]])
        )
        self.overrides_seen: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # The gradient does not depend on the batch, so every rank and a single process train identically.
        return (self.scale - 1.0) ** 2 + 0.0 * batch[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)

    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor, seeds: torch.Tensor, guide: Any = None, **overrides: Any
    ) -> torch.Tensor:
        self.overrides_seen.append(overrides)
        noise = torch.stack(
            [torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
        ).to(self.device)
        x = nn.functional.interpolate(noise, size=SIZE, mode="bilinear", align_corners=False)
        return torch.tanh(self.scale * x + self.class_colour[labels].view(-1, 3, 1, 1))


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=4)


def reference_images(n: int = 40, seed: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=SIZE, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def make_reference(path: Path, extractor: PixelProjection) -> FIDStats:
    """A kit reference file of `reference_images` (what fid-stats writes); returns its pool statistics."""
    images = reference_images()
    feats = {k: v.float().numpy() for k, v in extractor.features(images, ("pool", "spatial")).items()}
    features = FeatureSet(feats, SeamProfile.of_images(images), len(images), extractor.name)
    save_reference(path, features)
    return features.stats("pool")


def load_stats(path: Path) -> Reference:
    return _read_stats_file(path, _npz_keys(path))


def offline_fid(module: Any, callback: MetricsCallback, ref: FIDStats) -> float:
    """The FID the callback should report, recomputed from scratch on one process."""
    index = torch.arange(callback.num_samples)
    images = module.generate(index % module.num_classes, index + callback.seed)
    uint8 = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    stats = FIDStats.from_features(callback.extractor(uint8).float())
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)


def fid_history(callback: MetricsCallback) -> list[tuple[int, float]]:
    """``(step, fid)`` of every evaluation of ``callback``."""
    return [(step, float(r["fid"])) for step, r in callback.results if r.get("fid") is not None]


def trainer(root: Path, callbacks: list[pl.Callback], max_steps: int = 4, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fid_callback_schedule_logging_and_reproducibility(tmp_path: Path) -> None:
    extractor = PixelProjection(num_features=12, size=4)
    ref = make_reference(tmp_path / "ref.npz", extractor)
    callback = MetricsCallback(
        metrics=["fid"],
        every_n_steps=2,
        num_samples=14,
        batch_size=4,
        reference=str(tmp_path / "ref.npz"),
        extractor=extractor,
    )
    callback_cfg = MetricsCallback(
        metrics=["fid"],
        every_n_steps=3,
        num_samples=6,
        batch_size=6,
        reference=str(tmp_path / "ref.npz"),
        extractor=extractor,
        num_steps=7,
        cfg_scale=2.0,
        csv_name="fid_cfg.csv",
        prefix="val_cfg/",
    )
    module = ToyGenerator()
    logger = CSVLogger(tmp_path, name="logs")
    fit = trainer(tmp_path, [callback, callback_cfg], logger=logger, log_every_n_steps=50)
    fit.fit(module, loader())

    # every 2 steps; step 4 is the last step, so on_train_end does not repeat it.
    assert [step for step, _ in fid_history(callback)] == [2, 4]
    assert [step for step, _ in fid_history(callback_cfg)] == [3, 4]  # step 3, then train end
    values = [fid for _, fid in fid_history(callback)]
    assert values[0] != values[1]  # the model changed between evaluations
    assert values[1] == pytest.approx(offline_fid(module, callback, ref), rel=1e-9)
    assert {"num_steps": 7, "cfg_scale": 2.0} in module.overrides_seen

    rows = read_csv(log_dir(tmp_path) / "eval_metrics.csv")  # not the logger's folder
    assert list(rows[0]) == ["step", "images_seen", "fid", "num_samples", "seconds", "unix_time"]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert [int(r["images_seen"]) for r in rows] == [8, 16]  # batch 4, one process
    assert [float(r["fid"]) for r in rows] == pytest.approx(values, rel=1e-12)
    assert rows[0]["num_samples"] == "14"
    # Reached the logger although 2 and 4 are not multiples of log_every_n_steps.
    logged = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("val/fid")]
    assert [int(r["step"]) for r in logged] == [2, 4]
    assert [float(r["val/fid"]) for r in logged] == pytest.approx(values, rel=1e-9)
    assert float(fit.callback_metrics["val/fid"]) == values[1]
    assert float(fit.callback_metrics["val_cfg/fid"]) == fid_history(callback_cfg)[-1][1]
    cfg_logged = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("val_cfg/fid")]
    assert [int(r["step"]) for r in cfg_logged] == [3, 4]

    # The metric is not part of the model or of its checkpoint; the callback saves only bookkeeping.
    assert not any(isinstance(m, PixelProjection) for m in module.modules())
    assert set(module.state_dict()) == {"scale", "class_colour"}
    assert callback.state_dict() == {
        "results": [[2, {"fid": values[0]}], [4, {"fid": values[1]}]],
        "last_eval_step": 4,
    }
    # Exact resume: the state round-trips.
    again = MetricsCallback(
        metrics=["fid"], reference=str(tmp_path / "ref.npz"), every_n_steps=2, num_samples=14
    )
    again.load_state_dict(callback.state_dict())
    assert fid_history(again) == fid_history(callback) and again.state_dict() == callback.state_dict()


def test_fid_callback_samples_with_ema_weights(tmp_path: Path) -> None:
    extractor = PixelProjection(num_features=12, size=4)
    ref = make_reference(tmp_path / "ref.npz", extractor)
    common = dict(every_n_steps=3, num_samples=24, batch_size=12, reference=str(tmp_path / "ref.npz"))
    with_ema = MetricsCallback(
        metrics=["fid"], **common, extractor=extractor, use_ema=True, csv_name="ema.csv"
    )
    raw = MetricsCallback(metrics=["fid"], **common, extractor=extractor, use_ema=False, csv_name="raw.csv")
    ema = EMA(decay=0.5)
    module = ToyGenerator()
    fit = trainer(tmp_path, [ema, with_ema, raw], max_steps=3, logger=False)
    fit.fit(module, loader())

    assert fid_history(with_ema)[0][0] == fid_history(raw)[0][0] == 3
    assert fid_history(with_ema)[0][1] != pytest.approx(fid_history(raw)[0][1], rel=1e-6)
    assert ema.averaged_module is not None
    assert fid_history(with_ema)[0][1] == pytest.approx(
        offline_fid(ema.averaged_module, with_ema, ref), rel=1e-9
    )
    # No logger: the run folder's log folder all the same.
    assert (log_dir(tmp_path) / "ema.csv").is_file() and (log_dir(tmp_path) / "raw.csv").is_file()


def write_shard(path: Path, images: torch.Tensor) -> None:
    with tarfile.open(path, "w") as tar:
        for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            for name, payload in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def run_real_shards(root: Path, shards: str, **kwargs: Any) -> tuple[MetricsCallback, pl.Trainer]:
    callback = MetricsCallback(
        metrics=["fid"],
        every_n_steps=2,
        num_samples=10,
        batch_size=3,
        real_shards=shards,
        real_num_samples=30,
        real_cache=str(root / "real_cache.npz"),
        extractor=PixelProjection(num_features=12, size=4),
        on_train_end=False,
    )
    fit = trainer(root, [callback], max_steps=2, logger=False, **kwargs)
    fit.fit(ToyGenerator(), loader())
    return callback, fit


def test_fid_callback_real_shards_cache_and_missing_reference(tmp_path: Path) -> None:
    images = reference_images(36)
    write_shard(tmp_path / "val-000000.tar", images)
    callback, _ = run_real_shards(tmp_path, str(tmp_path / "val-000000.tar"))
    cache = load_stats(tmp_path / "real_cache.npz").stats["pool"]
    assert cache.num_samples == 30  # real_num_samples of the 36 images
    expected = FIDStats.from_features(callback.extractor(images[:30]).float())
    np.testing.assert_allclose(cache.sigma, expected.sigma, atol=1e-12)
    # A second run loads the cache instead of reading shards (the shard is gone) and gets the same FID.
    (tmp_path / "val-000000.tar").unlink()
    again, _ = run_real_shards(tmp_path, str(tmp_path / "val-000000.tar"))
    assert fid_history(again)[0][1] == pytest.approx(fid_history(callback)[0][1], rel=1e-9)

    with pytest.raises(ValueError, match="exactly one"):
        MetricsCallback(metrics=["fid"], reference=None, real_shards=None)
    with pytest.raises(ValueError, match="unknown metric"):
        MetricsCallback(reference="ref.npz", metrics=["fid", "kid"])
    missing = MetricsCallback(
        metrics=["fid"], reference=str(tmp_path / "nope.npz"), extractor=PixelProjection()
    )
    with pytest.raises(FileNotFoundError, match="fid-stats"):
        trainer(tmp_path, [missing], max_steps=1, logger=False).fit(ToyGenerator(), loader())
    # Statistics from another extractor are refused rather than mixed.
    other = tmp_path / "other.npz"
    np.savez(
        other,
        mu=cache.mu,
        sigma=cache.sigma,
        num_samples=np.int64(30),
        extractor=np.str_("another-extractor"),
    )
    wrong = MetricsCallback(
        metrics=["fid"],
        every_n_steps=1,
        num_samples=4,
        reference=str(other),
        extractor=PixelProjection(12, 4),
    )
    with pytest.raises(ValueError, match="another-extractor"):
        trainer(tmp_path, [wrong], max_steps=1, logger=False).fit(ToyGenerator(), loader())


def test_fid_callback_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    extractor = PixelProjection(num_features=12, size=4)
    make_reference(tmp_path / "ref.npz", extractor)
    write_shard(tmp_path / "val-000000.tar", reference_images(25))
    shards = str(tmp_path / "val-000000.tar")

    def run(root: Path, devices: int, **kwargs: Any) -> list[float]:
        from_file = MetricsCallback(
            metrics=["fid"],
            every_n_steps=2,
            num_samples=13,  # not divisible by the world size
            batch_size=4,
            reference=str(tmp_path / "ref.npz"),
            extractor=extractor,
            csv_name="fid_ref.csv",
        )
        from_shards = MetricsCallback(
            metrics=["fid"],
            every_n_steps=2,
            num_samples=13,
            batch_size=4,
            real_shards=shards,
            real_num_samples=25,
            real_cache=str(root / "cache.npz"),
            extractor=extractor,
            csv_name="fid_shards.csv",
        )
        fit = trainer(root, [from_file, from_shards], max_steps=3, logger=False, devices=devices, **kwargs)
        fit.fit(ToyGenerator(), loader())
        return [
            float(r["fid"])
            for name in ("fid_ref.csv", "fid_shards.csv")
            for r in read_csv(log_dir(root) / name)
        ]

    single = run(tmp_path / "single", devices=1)
    ddp = run(tmp_path / "ddp", devices=2, strategy="ddp_fork")
    assert len(single) == 4  # steps 2 and 3 (train end) for both callbacks
    assert ddp == pytest.approx(single, rel=1e-7)
    # Real statistics gathered over both ranks: all 25 images, once.
    assert load_stats(tmp_path / "ddp" / "cache.npz").stats["pool"].num_samples == 25


def test_fid_callback_with_the_real_dip_module_and_ema(tmp_path: Path) -> None:
    import functools

    from dip_lightning.core.diffusion import EulerSampler
    from dip_lightning.core.images import to_uint8
    from dip_lightning.core.models.dip import DiP
    from dip_lightning.core.models.heads import PatchDetailerHead
    from dip_lightning.training.callbacks.ema import sampling_module
    from dip_lightning.training.module import DiPModule

    pl.seed_everything(0)
    net = DiP(
        input_size=SIZE,
        patch_size=8,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        head=functools.partial(PatchDetailerHead, base_channels=4, depth=2),
    )
    module = DiPModule(net=net, sampler=EulerSampler(num_steps=2))
    extractor = PixelProjection(num_features=8, size=4)
    ref = make_reference(tmp_path / "ref.npz", extractor)
    callback = MetricsCallback(
        metrics=["fid"],
        every_n_steps=2,
        num_samples=10,
        batch_size=4,
        reference=str(tmp_path / "ref.npz"),
        extractor=extractor,
        num_steps=3,
        cfg_scale=1.5,
    )
    ema = EMA(decay=0.9)
    data = TensorDataset(torch.rand(16, 3, SIZE, SIZE) * 2 - 1, torch.arange(16) % 3)
    fit = trainer(tmp_path, [ema, callback], max_steps=2, logger=False)
    fit.fit(module, DataLoader(data, batch_size=4))

    assert [step for step, _ in fid_history(callback)] == [2]
    generator = sampling_module(fit, module, use_ema=True)
    assert generator is ema.averaged_module
    index = torch.arange(10)
    images = generator.generate(index % 3, index, num_steps=3, cfg_scale=1.5)
    stats = FIDStats.from_features(extractor(to_uint8(images)).float())
    expected = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    assert fid_history(callback)[0][1] == pytest.approx(expected, rel=1e-6)
    assert not any("extractor" in key or "inception" in key for key in module.state_dict())


def test_fid_callback_and_extractor_build_from_a_yaml_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_string(
        """
callbacks:
  - class_path: dip_lightning.training.callbacks.MetricsCallback
    init_args:
      metrics: [fid]
      every_n_steps: 10
      reference: ref.npz
      cfg_scale: 2.9
      cfg_interval: [0.11, 0.97]
      extractor:
        class_path: dip_lightning.core.metrics.features.PixelProjection
        init_args: {num_features: 8}
"""
    )
    callback = parser.instantiate(config).callbacks[0]
    assert isinstance(callback, MetricsCallback) and isinstance(callback.extractor, PixelProjection)
    assert callback.extractor.num_features == 8
    assert callback.sampler_overrides == {"cfg_scale": 2.9, "cfg_interval": (0.11, 0.97)}


# ------------------------------------------------------------------------------------------ the full suite
ALL = ["fid", "sfid", "inception_score", "precision", "recall", "patch_seam", "class_agreement"]


def suite_callback(ref: Path, **kwargs: Any) -> MetricsCallback:
    return MetricsCallback(
        every_n_steps=2,
        num_samples=kwargs.pop("num_samples", 13),  # not divisible by the world size
        batch_size=4,
        reference=str(ref),
        metrics=ALL,
        extractor=PixelProjection(num_features=12, size=4),
        patch_size=4,
        cache_dir=str(ref.parent / "cache"),
        **kwargs,
    )


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    from dip_lightning.core.images import to_uint8

    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def test_metrics_callback_logs_every_metric_and_equals_the_evaluate_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.savez(
        tmp_path / "real.npz", arr_0=reference_images().permute(0, 2, 3, 1).numpy(), arr_1=np.arange(40) % 3
    )
    callback = suite_callback(tmp_path / "real.npz", num_samples=24)
    module = ToyGenerator()
    logger = CSVLogger(tmp_path, name="logs")
    fit = trainer(tmp_path, [callback], max_steps=3, logger=logger, log_every_n_steps=50)
    fit.fit(module, loader())

    assert [step for step, _ in callback.results] == [2, 3]
    last = callback.results[-1][1]
    assert set(last) == set(ALL) and all(v is not None for v in last.values())
    rows = read_csv(log_dir(tmp_path) / "eval_metrics.csv")  # not the logger's folder
    assert list(rows[0]) == ["step", "images_seen", *ALL, "num_samples", "seconds", "unix_time"]
    assert [float(rows[-1][m]) for m in ALL] == [last[m] for m in ALL]  # written with repr: exact
    logged = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("val/fid")]
    assert [int(r["step"]) for r in logged] == [2, 3]
    assert {m: float(logged[-1][f"val/{m}"]) for m in ALL} == pytest.approx(last, rel=1e-12)
    assert float(fit.callback_metrics["val/patch_seam"]) == last["patch_seam"]

    # The command on the same images (written as an ADM sample npz) gives the same numbers.
    import dip_lightning.commands.evaluate as evaluate_module

    index = torch.arange(24)
    images = to_uint8_images(module.generate(index % module.num_classes, index))
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=(index % module.num_classes).numpy())
    out = tmp_path / "metrics.json"
    argv = [
        str(tmp_path / "samples.npz"),
        str(tmp_path / "real.npz"),
        "--patch_size",
        "4",
        "--json",
        str(out),
    ]
    argv += ["--metrics", *ALL, "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    monkeypatch.setattr(
        evaluate_module, "make_extractor", lambda *a: PixelProjection(num_features=12, size=4)
    )
    assert evaluate_module.main(argv) == 0
    record = json.loads(out.read_text())
    assert {m: record[m] for m in ALL} == pytest.approx(last, rel=1e-9)
    again = compute_metrics(
        images,
        tmp_path / "real.npz",
        ALL,
        4,
        extractor=PixelProjection(12, 4),
        cache_dir=None,
        labels=(index % module.num_classes).numpy(),
    )
    assert again == pytest.approx(last, rel=1e-9)


def test_metrics_callback_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    """Precision/recall need every sample's features: the gathered set must equal the single-process one."""
    np.savez(
        tmp_path / "real.npz", arr_0=reference_images().permute(0, 2, 3, 1).numpy(), arr_1=np.arange(40) % 3
    )

    def run(root: Path, devices: int, **kwargs: Any) -> list[dict[str, str]]:
        callback = suite_callback(tmp_path / "real.npz")
        fit = trainer(root, [callback], max_steps=2, logger=False, devices=devices, **kwargs)
        fit.fit(ToyGenerator(), loader())
        return read_csv(log_dir(root) / "eval_metrics.csv")

    single = run(tmp_path / "single", devices=1)
    ddp = run(tmp_path / "ddp", devices=2, strategy="ddp_fork")
    assert len(single) == len(ddp) == 1
    assert {m: float(ddp[0][m]) for m in ALL} == pytest.approx(
        {m: float(single[0][m]) for m in ALL}, rel=1e-9
    )
    assert int(ddp[0]["images_seen"]) == 2 * 2 * 4  # 2 steps x 2 ranks x batch 4


def test_metrics_callback_patch_size_from_the_module_and_unavailable_metrics(tmp_path: Path) -> None:
    np.savez(tmp_path / "real.npz", arr_0=reference_images().permute(0, 2, 3, 1).numpy())
    module = ToyGenerator()
    module.net = nn.Module()
    module.net.patch_size = 8
    callback = MetricsCallback(
        every_n_steps=2,
        num_samples=8,
        batch_size=4,
        reference=str(tmp_path / "real.npz"),
        metrics=["fid", "patch_seam", "fd_dinov2"],
        extractor=PixelProjection(12, 4),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(UserWarning, match="fd_dinov2: not computed"):
        trainer(tmp_path, [callback], max_steps=2, logger=False).fit(module, loader())
    result = callback.results[0][1]
    assert result["fd_dinov2"] is None and result["patch_seam"] is not None
    assert callback._engine is not None and callback._engine.patch_size == 8
    row = read_csv(log_dir(tmp_path) / "eval_metrics.csv")[0]
    assert row["fd_dinov2"] == "" and float(row["patch_seam"]) == result["patch_seam"]


def test_eval_metrics_csv_reports_the_monitors_images_seen_under_accumulation(tmp_path: Path) -> None:
    """One count of images: eval_metrics.csv and the logged train/images_seen agree, accumulation included."""
    extractor = PixelProjection(num_features=12, size=4)
    make_reference(tmp_path / "ref.npz", extractor)
    callback = MetricsCallback(
        metrics=["fid"],
        every_n_steps=2,
        num_samples=6,
        reference=str(tmp_path / "ref.npz"),
        extractor=extractor,
    )
    logger = CSVLogger(tmp_path, name="logs")
    fit = trainer(
        tmp_path, [callback, TrainingMonitor()], logger=logger, log_every_n_steps=2, accumulate_grad_batches=2
    )
    fit.fit(ToyGenerator(), loader())
    rows = read_csv(log_dir(tmp_path) / "eval_metrics.csv")  # the run folder's log folder
    assert [(int(r["step"]), int(r["images_seen"])) for r in rows] == [
        (2, 16),
        (4, 32),
    ]  # batch 4 x 2 x steps
    logged = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("train/images_seen")]
    assert [float(r["train/images_seen"]) for r in logged] == [16.0, 32.0]
