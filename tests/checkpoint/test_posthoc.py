"""Post-hoc EMA (power-function profiles, :mod:`dip_lightning.core.phema`): the profile math, a reconstruction
against a directly tracked EMA of the same profile (a toy parameter sequence, then a tiny real CLI run with
``ema-reconstruct`` and ``sample``), and an exact resume of the tracked profiles and their snapshots."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from dip_lightning.__main__ import main as dip_main
from dip_lightning.checkpoint.io import CheckpointError
from dip_lightning.checkpoint.posthoc import find_snapshots, reconstruct, snapshot_path, std_key
from dip_lightning.core.images import to_uint8
from dip_lightning.core.phema import (
    MAX_STD,
    exponent_to_std,
    power_ema_decay,
    profile_inner_product,
    std_to_exponent,
)
from dip_lightning.training.callbacks.ema import average_in_groups
from dip_lightning.training.loading import load_module
from tests.helpers.resume import assert_equal_nested, probe_args, resume_args, run_fit
from tests.helpers.tiny import HIGH_LR, fit_with, tiny_args


def test_std_and_exponent_are_inverse() -> None:
    for std in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert exponent_to_std(std_to_exponent(std)) == pytest.approx(std, rel=1e-12)
    assert exponent_to_std(0.0) == pytest.approx(MAX_STD)  # gamma = 0: the uniform average of all steps
    for bad in (0.0, MAX_STD, -0.1):
        with pytest.raises(ValueError, match="std lies in"):
            std_to_exponent(bad)


def test_profile_inner_product_is_the_integral_of_the_two_profiles() -> None:
    tau = np.linspace(0.0, 1000.0, 2_000_001)

    def profile(step: float, std: float) -> np.ndarray:
        gamma = std_to_exponent(std)
        return np.where(tau <= step, (gamma + 1) * tau**gamma / step ** (gamma + 1), 0.0)

    for a, b in (((600, 0.05), (1000, 0.1)), ((1000, 0.2), (400, 0.1)), ((800, 0.1), (800, 0.1))):
        numeric = np.trapezoid(profile(*a) * profile(*b), tau)
        assert profile_inner_product(*a, *b) == pytest.approx(numeric, rel=1e-4)


def track(sequence: list[dict[str, torch.Tensor]], std: float) -> list[dict[str, torch.Tensor]]:
    """A power-function EMA of ``sequence`` by the callback's update: the state after each step (1-based)."""
    average = {k: v.clone() for k, v in sequence[0].items()}
    states = []
    for step, weights in enumerate(sequence, start=1):
        decay = power_ema_decay(std, step)
        average_in_groups(get_ema_multi_avg_fn(decay), average.values(), weights.values(), step - 1)
        states.append({k: v.clone() for k, v in average.items()})
    return states


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def test_reconstruction_of_a_toy_sequence_matches_the_tracked_profile(tmp_path: Path) -> None:
    """400 steps of a random walk with a drift; profiles 0.05 and 0.10 stored every 20 steps; std 0.07
    reconstructed at step 400 and at step 200, against a directly tracked 0.07."""
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(1, 401, dtype=torch.float64)[:, None]
    walk = torch.randn(400, 500, generator=g, dtype=torch.float64).cumsum(0) + 5 * torch.sin(steps / 30)
    sequence = [{"w": row.float(), "b": row[:7].float()} for row in walk]
    tracked = {std: track(sequence, std) for std in (0.05, 0.1, 0.07)}
    for step in range(20, 401, 20):
        weights = {std_key(s): tracked[s][step - 1] for s in (0.05, 0.1)}
        torch.save({"step": step, "stds": [0.05, 0.1], "weights": weights}, snapshot_path(tmp_path, step))
    assert [s.step for s in find_snapshots(tmp_path)] == list(range(20, 401, 20))
    for step in (400, 200):
        rebuilt = reconstruct(tmp_path, 0.07, step=step)
        assert rebuilt.weights["w"].dtype == torch.float32 and (rebuilt.std, rebuilt.step) == (0.07, step)
        assert sum(rebuilt.coefficients) == pytest.approx(1.0)
        direct = tracked[0.07][step - 1]
        error = distance(rebuilt.weights, direct)
        nearest = min(distance(tracked[s][step - 1], direct) for s in (0.05, 0.1))
        assert error < 0.01 * nearest, (step, error, nearest)  # measured: 0.0008 (step 400), 0.0076 (200)
    with pytest.raises(CheckpointError, match="no snapshot at step 390"):
        reconstruct(tmp_path, 0.07, step=390)
    with pytest.raises(CheckpointError, match="at least 2"):
        reconstruct(tmp_path, 0.07, step=20, from_stds=[0.05])


RUN_STEPS, EVERY = 32, 4
PHEMA = ["--trainer.callbacks+=dip_lightning.training.callbacks.PowerFunctionEMA"]


def phema_args(stds: list[float], every: int = EVERY) -> list[str]:
    return [
        *PHEMA,
        f"--trainer.callbacks.init_args.stds={json.dumps(stds)}",
        f"--trainer.callbacks.init_args.snapshot_every_n_steps={every}",
    ]


def test_reconstruction_in_a_tiny_run_matches_the_tracked_profile(
    tmp_path: Path, demo_data: dict, capsys: pytest.CaptureFixture
) -> None:
    """A 32-step CLI run tracking stds 0.1, 0.2 and 0.15; ``ema-reconstruct --std 0.15`` from 0.1 and 0.2 only
    is close to the tracked 0.15; ``sample`` reads the reconstruction."""
    run = tmp_path / "run"
    fit_with(tiny_args(run, demo_data, HIGH_LR, *phema_args([0.1, 0.2, 0.15]), steps=RUN_STEPS))
    snapshots = find_snapshots(run / "phema")
    assert [s.step for s in snapshots] == list(range(EVERY, RUN_STEPS + 1, EVERY))
    out = tmp_path / "phema.ckpt"
    args = ["ema-reconstruct", str(run), "--std", "0.15", "--from_std", "0.1", "0.2"]
    assert dip_main([*args, "--out", str(out)]) == 0
    assert f"wrote {out}: std 0.15 at step {RUN_STEPS}" in capsys.readouterr().out
    rebuilt = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(snapshots[-1].path, map_location="cpu", weights_only=True)["weights"]
    direct = last[std_key(0.15)]
    error = distance(rebuilt, direct)
    nearest = min(distance(last[std_key(s)], direct) for s in (0.1, 0.2))
    assert error < 0.02 * nearest, (error, nearest)  # measured: 0.0013
    assert dip_main([*args, "--out", str(out)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err

    module = load_module(out)
    assert module.loaded_weights == f"phema std 0.15 at step {RUN_STEPS}"
    export = tmp_path / "samples.npz"
    sample = [
        "sample",
        "--ckpt_path",
        str(out),
        "--num_samples",
        "2",
        "--batch_size",
        "2",
        "--out",
        str(export),
    ]
    assert dip_main(sample) == 0
    expected = module.generate(torch.arange(2), torch.arange(2))
    assert np.array_equal(np.load(export)["arr_0"], to_uint8(expected).permute(0, 2, 3, 1).numpy())
    job = json.loads((export.with_name(export.name + ".parts") / "job.json").read_text())
    assert job["weights"] == f"phema std 0.15 at step {RUN_STEPS}"


@pytest.mark.slow
def test_sigterm_then_fit_again_continues_the_profiles_bit_exact(tmp_path: Path, demo_data: dict) -> None:
    """The tracked profiles resume from the preemption checkpoint: every snapshot of the resumed run equals the
    uninterrupted run's."""
    extra = phema_args([0.1, 0.2], every=5)
    stop, _ = run_fit(resume_args(tmp_path / "ref", demo_data, *extra, steps=20))
    assert stop is None
    run = tmp_path / "run"
    stop, _ = run_fit(
        resume_args(run, demo_data, *extra, *probe_args(tmp_path / "out", signal_at_step=8), steps=20)
    )
    assert stop is not None and stop.signum == signal.SIGTERM and 9 <= stop.step < 20
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["phema"]["stds"] == [0.1, 0.2]
    stop, _ = run_fit(resume_args(run, demo_data, *extra, steps=20))
    assert stop is None
    want, got = find_snapshots(tmp_path / "ref" / "phema"), find_snapshots(run / "phema")
    assert [s.step for s in got] == [s.step for s in want] == [5, 10, 15, 20]
    for a, b in zip(got, want):
        assert_equal_nested(
            torch.load(a.path, weights_only=True)["weights"],
            torch.load(b.path, weights_only=True)["weights"],
            a.path.name,
        )
    final = torch.load(b.path, weights_only=True)["weights"]
    assert distance(final[std_key(0.1)], final[std_key(0.2)]) > 0  # not vacuous: the profiles differ
