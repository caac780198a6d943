"""DiPModule: what the training step draws and from where."""

from __future__ import annotations

from pathlib import Path

import torch

from dip_lightning.training.cli import DiPCLI
from tests.helpers.resume import resume_args


def test_training_noise_ignores_the_global_rng(tmp_path: Path, demo_data: dict) -> None:
    """The flow's noise, time and dropout draws are keyed by (seed, rank, step), not the global RNG."""
    cli = DiPCLI(args=resume_args(tmp_path / "run", demo_data), run=False)
    module = cli.model
    x, y = torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    first = module._losses(x, y, generator=module._training_generator(x.device))["loss"]
    module._noise_step = None  # a fresh process at the same step
    torch.manual_seed(123)
    torch.rand(1000)
    again = module._losses(x, y, generator=module._training_generator(x.device))["loss"]
    assert torch.equal(first, again)
    second_micro = module._losses(x, y, generator=module._training_generator(x.device))["loss"]
    assert not torch.equal(first, second_micro)  # the next micro-batch of the same step draws anew
