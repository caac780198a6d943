"""Autoguidance through the module and the training callbacks, with real checkpoints: the guide is the step-2
checkpoint of the run whose last checkpoint it guides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from dip_lightning.core.errors import ConfigError
from dip_lightning.training.autoguidance import Guide, load_guide
from dip_lightning.training.callbacks import MetricsCallback, SampleGrid
from dip_lightning.training.loading import load_module
from tests.helpers.tiny import ema_callback, fit_with, grid_callback, read_png, tiny_args

LABELS, SEEDS = torch.tensor([0, 3, 5]), torch.tensor([10, 11, 12])


def test_generate_at_weight_one_is_the_model_and_at_zero_the_guide(guide_checkpoints: dict) -> None:
    main = load_module(guide_checkpoints["main"])
    guide = load_guide(guide_checkpoints["guide"], main)
    assert isinstance(guide, Guide) and guide.loaded_weights == main.loaded_weights  # the EMA of both
    alone = main.generate(LABELS, SEEDS, num_steps=3)
    guide_alone = load_module(guide_checkpoints["guide"]).generate(LABELS, SEEDS, num_steps=3)
    assert not torch.allclose(alone, guide_alone, atol=1e-3)  # two different models, or nothing is shown
    assert torch.equal(main.generate(LABELS, SEEDS, guide=guide, num_steps=3, cfg_scale=1.0), alone)
    everywhere = {"num_steps": 3, "cfg_scale": 0.0, "cfg_interval": (-1.0, 2.0)}
    assert torch.equal(main.generate(LABELS, SEEDS, guide=guide, **everywhere), guide_alone)
    guided = main.generate(LABELS, SEEDS, guide=guide, num_steps=3, cfg_scale=2.0)
    cfg = main.generate(LABELS, SEEDS, num_steps=3, cfg_scale=2.0)
    assert not torch.allclose(guided, alone, atol=1e-4) and not torch.allclose(guided, cfg, atol=1e-4)


def test_a_guide_of_another_patch_size_or_a_missing_one_is_refused(guide_checkpoints: dict) -> None:
    main = load_module(guide_checkpoints["main"])
    other = guide_checkpoints["other"]
    with pytest.raises(ConfigError, match=r"patch size 16 \(the model's: 8\)"):
        load_guide(other, main)
    with pytest.raises(ConfigError, match="patch size 16"):  # generate checks it too, before sampling
        main.generate(LABELS, SEEDS, guide=Guide(str(other)), cfg_scale=2.0)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        Guide(str(other) + ".missing")


class GuideCalls(Callback):
    """Counts the forwards of every callback's guide network during the fit."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        for callback in trainer.callbacks:
            guide = getattr(callback, "guide", None)
            if guide is not None:
                name = type(callback).__name__
                self.calls[name] = 0
                guide.net.register_forward_pre_hook(lambda *_, name=name: self._count(name))

    def _count(self, name: str) -> None:
        self.calls[name] += 1


def test_grids_and_metrics_of_a_fit_take_a_guide_from_yaml(
    guide_checkpoints: dict, demo_data: dict, tmp_path: Path
) -> None:
    from dip_lightning.core.metrics.sources import iter_shard_images
    from dip_lightning.evaluation.export import _save_npz

    images = [
        b.permute(0, 2, 3, 1).numpy() for b in iter_shard_images(demo_data["val_shards"], 8, 32, limit=8)
    ]
    reference = tmp_path / "reference.npz"
    _save_npz(reference, arr_0=images[0])
    guide = {
        "class_path": "dip_lightning.training.autoguidance.Guide",
        "init_args": {"path": str(guide_checkpoints["guide"])},
    }
    # 3 Euler steps at t = 0, 1/3, 2/3; the interval (0.2, 0.5) guides the one at 1/3.
    sampling = {"num_steps": 3, "cfg_scale": 2.0, "cfg_interval": [0.2, 0.5], "guide": guide}
    grid = grid_callback(every_n_steps=2, classes=[0, 1], cols=2, **sampling)
    metrics = {
        "class_path": "dip_lightning.training.callbacks.MetricsCallback",
        "init_args": {"every_n_steps": 2, "num_samples": 4, "batch_size": 4, "reference": str(reference),
                      "metrics": ["patch_seam"], "on_train_end": False, **sampling},
    }  # fmt: skip
    calls = GuideCalls()
    cli = fit_with(
        tiny_args(tmp_path / "run", demo_data, steps=2, callbacks=[ema_callback(), grid, metrics]), calls
    )
    assert calls.calls == {"SampleGrid": 1, "MetricsCallback": 1}  # one guided step of one batch each
    by_type = {type(c): c for c in cli.trainer.callbacks}
    assert by_type[MetricsCallback].results[0][1]["patch_seam"] is not None
    png = read_png(by_type[SampleGrid].last_written)
    # The grid is what generate gives with the same guide and settings.
    module = by_type[SampleGrid].generate_grid(cli.trainer, cli.model)[0]
    assert torch.equal(png, module)


def test_a_guide_that_does_not_fit_stops_the_fit_before_training(
    guide_checkpoints: dict, demo_data: dict, tmp_path: Path
) -> None:
    guide = {
        "class_path": "dip_lightning.training.autoguidance.Guide",
        "init_args": {"path": str(guide_checkpoints["other"])},
    }
    grid = grid_callback(every_n_steps=1, cfg_scale=2.0, guide=guide)
    with pytest.raises(ConfigError, match="patch size 16"):
        fit_with(tiny_args(tmp_path / "run", demo_data, steps=1, callbacks=[grid]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_sampling_caller_takes_a_guide() -> None:
    import inspect

    from dip_lightning.commands import sample, sweep

    for callback in (MetricsCallback, SampleGrid):
        assert "guide" in inspect.signature(callback.__init__).parameters, callback
    parsed = sample.build_parser().parse_args(["--ckpt_path", "c", "--out", "o", "--guide", "g"])
    assert parsed.guide == "g" and parsed.guide_weights is None
    required = ["--ckpt_path", "c", "--reference", "r", "--num_samples", "2", "--out", "o"]
    assert sweep.build_parser().parse_args([*required, "--guide", "none", "g"]).guide == ["none", "g"]
