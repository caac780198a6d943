"""The preemption guard and the per-job timer: SLURM requeue only under SLURM, signal handlers installed and
restored, Lightning's per-step SIGTERM broadcast skipped while the guard owns SIGTERM, max_time per job."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.io import AtomicCheckpointIO
from dip_lightning.core.compat import cluster_environment
from dip_lightning.training.callbacks.preemption import PerJobTimer, PreemptionGuard
from dip_lightning.training.cli import DiPCLI
from tests.helpers.resume import probe_args, resume_args, run_fit
from tests.helpers.toy_fit import ToyRegression, cpu_trainer


def test_max_time_counts_per_job(tmp_path: Path, demo_data: dict) -> None:
    """A job resumed from a checkpoint whose earlier jobs used up max_time does not stop at once."""
    run, out = tmp_path / "run", tmp_path / "out"
    max_time = '--trainer.max_time={"hours": 1}'
    stop, _ = run_fit(resume_args(run, demo_data, max_time, *probe_args(out, signal_at_step=3), steps=10))
    assert stop is not None and 4 <= stop.step < 10
    hpc = run / "hpc_ckpt_1.ckpt"
    ckpt = torch.load(hpc, map_location="cpu", weights_only=True)
    timer_key = next(k for k in ckpt["callbacks"] if "time_elapsed" in ckpt["callbacks"][k])
    assert timer_key.startswith("PerJobTimer")
    ckpt["callbacks"][timer_key]["time_elapsed"]["train"] = 3600.0 - 1e-3  # earlier jobs used the whole hour
    torch.save(ckpt, hpc)

    cli = DiPCLI(args=["fit", *resume_args(run, demo_data, max_time, *probe_args(out), steps=10)])
    assert [type(c) for c in cli.trainer.callbacks if "Timer" in type(c).__name__] == [PerJobTimer]
    assert cli.trainer.global_step == 10  # Lightning's Timer would stop after one more step


def test_cli_adds_slurm_requeue_only_under_slurm(
    tmp_path: Path, demo_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    cli = DiPCLI(args=resume_args(tmp_path / "laptop", demo_data), run=False)
    env = cluster_environment(cli.trainer)
    assert not isinstance(env, SLURMEnvironment)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, PreemptionGuard)]
    assert len(guards) == 1

    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NAME": "dip",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    cli = DiPCLI(args=[*resume_args(tmp_path / "cluster", demo_data), "--requeue_signal=SIGUSR2"], run=False)
    env = cluster_environment(cli.trainer)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR2
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, PreemptionGuard))
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    guard.setup(cli.trainer, cli.model, "fit")
    try:
        assert guard.requeue_signal == signal.SIGUSR2
        assert guard.signals == [signal.SIGUSR2, signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGUSR2) == guard._handler
    finally:
        guard.teardown(cli.trainer, cli.model, "fit")
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_guard_skips_lightnings_per_step_sigterm_broadcast_while_it_owns_sigterm() -> None:
    # Lightning broadcasts its SIGTERM flag before every DDP step (a collective + `.item()`); with the guard's
    # handler in place that flag cannot be set, so the guard swaps the broadcast out for the fit and back after.
    import lightning.pytorch as pl

    from dip_lightning.core.compat import sigterm_broadcast_skipped

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            seen.append(sigterm_broadcast_skipped(trainer))

    trainer = cpu_trainer(max_steps=3, callbacks=[PreemptionGuard(), Probe()])
    trainer.fit(ToyRegression())
    assert seen == [True] * 3
    assert not sigterm_broadcast_skipped(trainer)
