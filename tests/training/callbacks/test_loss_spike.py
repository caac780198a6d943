"""LossSpikeGuard on real CLI runs of the tiny config, with spikes injected by scaling a batch's images."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from dip_lightning.core.errors import ConfigError
from dip_lightning.training.callbacks import LossSpikeError, LossSpikeGuard, NonFiniteGuard
from dip_lightning.training.cli import DiPCLI
from tests.helpers.commands import run_command
from tests.helpers.resume import LogLines, assert_equal_nested, run_fit
from tests.helpers.spike_probe import InjectSpikes
from tests.helpers.tiny import ema_callback, fit_with, tiny_args

LR = 2e-3  # the tiny config's


def spike_guard(**init_args: Any) -> dict:
    options = {"window": 8, "num_mads": 20.0, "max_spikes": 2, "within_steps": 5, **init_args}
    return {"class_path": "dip_lightning.training.callbacks.LossSpikeGuard", "init_args": options}


def callbacks(device: bool = False, **guard_args: Any) -> list[dict]:
    nonfinite = {"class_path": "dip_lightning.training.callbacks.NonFiniteGuard", "init_args": {}}
    if device:
        nonfinite["init_args"]["check_every_n_steps"] = 2
    return [ema_callback(decay=0.9), nonfinite, spike_guard(**guard_args)]


def args_for(run: Path, data: dict, steps: int, *extra: str, **guard_args: Any) -> list[str]:
    device = guard_args.pop("device", False)
    fused = ["--model.optimizer.init_args.fused=true"] if device else []
    return tiny_args(
        run,
        data,
        "--checkpoint.every_n_train_steps=5",
        *fused,
        *extra,
        steps=steps,
        callbacks=callbacks(device, **guard_args),
        log_every_n_steps=5,
    )


def guard_of(cli: DiPCLI) -> LossSpikeGuard:
    return next(c for c in cli.trainer.callbacks if isinstance(c, LossSpikeGuard))


def fit_cli(args: list[str], inject: InjectSpikes | None = None) -> tuple[DiPCLI, list[str]]:
    """``fit`` as the command runs it (rollbacks included), in-process, with ``inject`` added; the CLI and
    Lightning's log lines."""
    handler = LogLines()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        cli = DiPCLI(args=args, run=False)
        if inject is not None:
            cli.trainer.callbacks.append(inject)
        cli.fit(cli.model, datamodule=cli.datamodule)
    finally:
        logger.removeHandler(handler)
    return cli, handler.lines


def final_state(cli: DiPCLI) -> dict:
    return {
        "net": cli.model.net.state_dict(),
        "optimizer": cli.trainer.optimizers[0].state_dict(),
        "ema": next(c for c in cli.trainer.callbacks if type(c).__name__ == "EMA").averages(),
    }


@pytest.mark.parametrize("mode", ["host", "device"])
def test_a_spike_is_skipped_and_counted(tmp_path: Path, demo_data: dict, mode: str) -> None:
    inject = InjectSpikes(steps=[12])
    cli = fit_with(args_for(tmp_path / "run", demo_data, 14, device=mode == "device"), inject)
    guard = guard_of(cli)
    assert inject.injected == [12] and inject.losses[12] > 50 * inject.losses[11]
    # Weights unchanged by the spiked step, changed by the steps around it; the EMA too (its update was skipped).
    assert_equal_nested(inject.weights[12], inject.weights[11], "step 12 vs 11")
    assert any(not torch.equal(inject.weights[13][k], inject.weights[12][k]) for k in inject.weights[12])
    assert int(guard._state["spikes"]) == 1 and int(guard._state["skipped"]) == 1 and guard.rollbacks == 0
    assert guard.spike_steps == ([12] if mode == "host" else [])
    nonfinite = next(c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert nonfinite.skipped_total == 0  # a spike is not a non-finite step
    # The healthy steps were judged (the window filled at step 8) and stayed below the threshold.
    assert 0 < float(guard._state["max_ratio"]) < 20


@pytest.mark.parametrize("mode", ["host", "device"])
def test_spikes_roll_back_lower_the_lr_and_the_run_finishes(
    tmp_path: Path, demo_data: dict, mode: str
) -> None:
    run = tmp_path / "run"
    args = args_for(run, demo_data, 20, device=mode == "device")
    cli, lines = fit_cli(args, InjectSpikes(steps=[12, 13]))
    guard = guard_of(cli)
    # Device mode reads the spike count every 2 steps: the rollback comes at the check after the second spike.
    at = 13 if mode == "host" else 14
    rollback = [line for line in lines if "rollback 1 of at most 3" in line]
    assert len(rollback) == 1 and f"at step {at}" in rollback[0], lines
    assert "steps [12, 13]" in rollback[0] and "last.ckpt (step 10)" in rollback[0]
    assert cli.trainer.global_step == 20 and guard.rollbacks == 1 and guard.lr_scale == 0.5
    assert int(guard._state["spikes"]) == 2  # the counts outlive the restore
    assert guard.spike_steps == ([12, 13] if mode == "host" else [])
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == LR * 0.5
    # Checkpoints after the rollback keep the configured lr in the optimizer and the scale in the guard's state.
    saved = torch.load(run / "checkpoints" / "step00000020.ckpt", map_location="cpu", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == LR
    assert saved["callbacks"]["LossSpikeGuard"]["lr_scale"] == 0.5
    assert saved["callbacks"]["LossSpikeGuard"]["live"]["groups"][0]["lr"] == LR * 0.5


def test_a_rollback_without_changes_reproduces_the_run_without_spikes(
    tmp_path: Path, demo_data: dict
) -> None:
    """lr_factor 1: the rollback only returns to step 10 and replays 11..20 (the injected spikes were transient).
    Bit for bit the run that never spiked: the continuation is an exact resume (weights, optimizer, EMA, data
    position, training noise)."""
    plain = fit_with(args_for(tmp_path / "plain", demo_data, 16))
    rolled, _ = fit_cli(
        args_for(tmp_path / "rolled", demo_data, 16, lr_factor=1.0), InjectSpikes(steps=[12, 13])
    )
    assert guard_of(rolled).rollbacks == 1
    assert_equal_nested(final_state(rolled), final_state(plain), "final state")


def test_resume_after_a_rollback_is_exact(tmp_path: Path, demo_data: dict) -> None:
    """A run that rolled back at step 13 and stopped at 17 resumes (from step 15, after the rollback) to the
    uninterrupted run's step 20, bit for bit: weights, every EMA, optimizer (the lowered lr too), guard state."""
    straight = tmp_path / "straight"
    fit_cli(args_for(straight, demo_data, 20), InjectSpikes(steps=[12, 13]))
    resumed = tmp_path / "resumed"
    first, _ = fit_cli(args_for(resumed, demo_data, 17), InjectSpikes(steps=[12, 13]))
    assert guard_of(first).rollbacks == 1
    stop, lines = run_fit(args_for(resumed, demo_data, 20))
    # The last checkpoint of the first job is step 15's (every 5 steps), after the rollback at step 13.
    assert stop is None and any("last.ckpt (step 15)" in line for line in lines)
    assert not any("changed" in line.lower() for line in lines)  # the checkpoint holds the configured lr
    want, got = (
        torch.load(run / "checkpoints" / "step00000020.ckpt", map_location="cpu", weights_only=False)
        for run in (straight, resumed)
    )
    for key in ("state_dict", "current_model_state", "ema", "optimizer_states", "lr_schedulers"):
        assert_equal_nested(got.get(key), want.get(key), key)
    assert_equal_nested(
        got["callbacks"]["LossSpikeGuard"], want["callbacks"]["LossSpikeGuard"], "guard state"
    )
    assert got["callbacks"]["LossSpikeGuard"]["live"]["groups"][0]["lr"] == LR * 0.5
    assert not torch.equal(
        got["state_dict"]["net.x_embedder.proj.weight"],
        got["current_model_state"]["net.x_embedder.proj.weight"],
    )  # not vacuous: EMA and raw weights differ


def test_skip_batches_skips_the_burst_on_the_replay(tmp_path: Path, demo_data: dict) -> None:
    inject = InjectSpikes(steps=[12, 13])
    cli, _ = fit_cli(args_for(tmp_path / "run", demo_data, 16, on_rollback="skip_batches"), inject)
    guard = guard_of(cli)
    assert guard.rollbacks == 1 and guard.skip_ranges == [(11, 13)] and guard.lr_scale == 1.0
    # The replay skipped steps 11..13: the weights after them are those of step 10 (restored from the checkpoint).
    for step in (11, 12, 13):
        assert_equal_nested(inject.weights[step], inject.weights[10], f"step {step} vs 10")
    assert any(not torch.equal(inject.weights[14][k], inject.weights[13][k]) for k in inject.weights[13])
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == LR


def test_spikes_after_max_rollbacks_stop_with_an_error(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    inject = InjectSpikes(steps=[12, 13], every_time=True)
    with pytest.raises(
        LossSpikeError, match=r"after 1 rollback\(s\) \(max_rollbacks 1\); stopped at step 13"
    ):
        fit_cli(args_for(run, demo_data, 20, max_rollbacks=1), inject)
    assert inject.injected == [12, 13, 12, 13]


def test_a_burst_before_the_first_checkpoint_lowers_the_lr_in_place(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    inject = InjectSpikes(steps=[10, 11])
    cli, _ = fit_cli(args_for(run, demo_data, 14, "--checkpoint.every_n_train_steps=100"), inject)
    guard = guard_of(cli)
    assert guard.rollbacks == 1 and guard.lr_scale == 0.5 and inject.injected == [10, 11]
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == LR * 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 1}, "window must be >= 2"),
        ({"lr_factor": 0.0}, r"lr_factor must be in \(0, 1\]"),
        ({"lr_factor": 2.0}, r"lr_factor must be in \(0, 1\]"),
        ({"num_mads": -1.0}, "num_mads must be > 0"),
        ({"max_spikes": 0}, "max_spikes must be >= 1"),
        ({"max_spikes": 5, "within_steps": 3}, r"within_steps must be >= max_spikes \(5\)"),
        ({"on_rollback": "restart"}, "on_rollback must be"),
        ({"max_rollbacks": -1}, "max_rollbacks must be >= 0"),
    ],
)
def test_bad_options_are_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LossSpikeGuard(**options)


def test_the_guard_needs_the_nonfinite_guard(tmp_path: Path, demo_data: dict) -> None:
    args = tiny_args(tmp_path / "run", demo_data, steps=2, callbacks=[spike_guard()])
    with pytest.raises(ConfigError, match="add dip_lightning.training.callbacks.NonFiniteGuard"):
        DiPCLI(args=["fit", *args])


@pytest.mark.slow
def test_ddp_both_ranks_roll_back_together(tmp_path: Path, demo_data: dict) -> None:
    """Two gloo processes; the batches of steps 12 and 13 are spiked on rank 0 only. The judged loss is the
    ranks' mean, so both ranks skip, both roll back to step 10 with the lower lr, and their weights stay equal."""
    out = tmp_path / "out"
    args = args_for(tmp_path / "run", demo_data, 16, "--trainer.devices=2", "--trainer.strategy=ddp")
    args += [
        "--trainer.callbacks+=tests.helpers.spike_probe.InjectSpikes",
        "--trainer.callbacks.init_args.steps=[12, 13]",
        "--trainer.callbacks.init_args.ranks=[0]",
        f"--trainer.callbacks.init_args.out_dir={out}",
    ]
    done = run_command("fit", *args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rollback 1 of at most 3 at step 13" in done.stderr + done.stdout
    records = [json.loads((out / f"spikes_rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["injected"] == [12, 13] and records[1]["injected"] == []
    for record in records:
        assert record["rollbacks"] == 1 and record["lr"] == LR * 0.5
    rank0, rank1 = (torch.load(out / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_equal_nested(rank0, rank1, "weights of rank 0 vs 1")
