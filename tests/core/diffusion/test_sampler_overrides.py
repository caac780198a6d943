"""One rule for the sampler settings an evaluation may choose (``SAMPLER_OVERRIDES``): every caller that takes
sampler settings takes exactly that set, None keeps the configured value, and any other field is refused."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from dip_lightning.checkpoint.format import WeightRequest
from dip_lightning.commands import sample as sample_command
from dip_lightning.commands import sweep as sweep_command
from dip_lightning.core.diffusion import (
    SAMPLER_OVERRIDES,
    SAMPLERS,
    EulerSampler,
    HeunSampler,
    override_sampler,
    sampler_overrides,
)
from dip_lightning.evaluation.sweep import Cell
from dip_lightning.training.callbacks import MetricsCallback, SampleGrid

#: Every name that could be taken for a sampler setting: the fields of every sampler, and the override list.
SAMPLER_NAMES = {f.name for cls in SAMPLERS.values() for f in dataclasses.fields(cls)} | set(
    SAMPLER_OVERRIDES
)


def _init_parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def _command_options(module: object, *required: str) -> set[str]:
    return set(vars(module.build_parser().parse_args(list(required))))


CALLERS = {
    "MetricsCallback": lambda: _init_parameters(MetricsCallback),
    "SampleGrid": lambda: _init_parameters(SampleGrid),
    "sweep Cell": lambda: {f.name for f in dataclasses.fields(Cell)},
    "sample command": lambda: _command_options(sample_command, "--ckpt_path", "c", "--out", "o"),
    "sweep command": lambda: _command_options(
        sweep_command, "--ckpt_path", "c", "--reference", "r", "--num_samples", "2", "--out", "o"
    ),
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_every_caller_takes_exactly_the_overridable_settings(caller: str) -> None:
    assert CALLERS[caller]() & SAMPLER_NAMES == set(SAMPLER_OVERRIDES)


def test_none_keeps_the_configured_value_and_other_fields_are_refused() -> None:
    sampler = HeunSampler(num_steps=7, cfg_scale=2.0, cfg_interval=(0.1, 0.9), time_shift=3.0)
    assert override_sampler(sampler) is sampler
    assert override_sampler(sampler, num_steps=None, cfg_scale=None, cfg_interval=None) is sampler
    changed = override_sampler(sampler, num_steps=3, cfg_interval=(0.2, 0.8))
    assert changed == HeunSampler(num_steps=3, cfg_scale=2.0, cfg_interval=(0.2, 0.8), time_shift=3.0)
    assert sampler.num_steps == 7  # a copy: the configured sampler is left as it was
    assert sampler_overrides(num_steps=None, cfg_scale=1.5) == {"cfg_scale": 1.5}
    with pytest.raises(TypeError, match="time_shift"):
        override_sampler(EulerSampler(), time_shift=2.0)


def test_callbacks_and_cells_keep_only_the_given_settings() -> None:
    grid = SampleGrid(num_steps=None, cfg_scale=2.0, cfg_interval=(0.3, 0.7))
    assert grid.sampler_overrides == {"cfg_scale": 2.0, "cfg_interval": (0.3, 0.7)}
    assert SampleGrid().sampler_overrides == {"num_steps": 50}  # a cheap grid by default
    metrics = MetricsCallback(reference="ref.npz", num_steps=4)
    assert metrics.sampler_overrides == {"num_steps": 4}
    cell = Cell(weights=WeightRequest.parse("ema:0.9"), cfg_interval=(0.1, 1.0))
    assert cell.sampler_overrides() == {"cfg_interval": (0.1, 1.0)}
