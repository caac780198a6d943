"""One way to ask for the weights of a checkpoint (``--weights ema|ema:D|raw|phema:S``): the syntax, and each kind
through ``sample`` and ``validate`` on a tiny real run that tracks two EMA decays and two power-function profiles;
``phema:S`` is what ``ema-reconstruct`` writes; errors name the file, what it holds and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.__main__ import main as dip_main
from dip_lightning.checkpoint.format import (
    ACCEPTED_FORMS,
    DEFAULT_WEIGHTS,
    WeightRequest,
    select_weights,
    weights_label,
)
from dip_lightning.checkpoint.io import CheckpointError, read_checkpoint
from dip_lightning.core.images import to_uint8
from dip_lightning.training.cli import DiPCLI
from dip_lightning.training.loading import load_module
from tests.helpers.tiny import HIGH_LR, fit_with, tiny_args

STEPS, EVERY, CHECKPOINT_EVERY = 6, 2, 3  # snapshots at steps 2, 4, 6; checkpoints at 3 and 6 (last.ckpt)
DECAYS, STDS = [0.5, 0.8], [0.1, 0.2]


# ---------------------------------------------------------------------------------------------- the syntax
def test_a_request_round_trips_through_its_text() -> None:
    for text, request in (
        ("ema", WeightRequest()),
        ("ema:0.9996", WeightRequest("ema", decay=0.9996)),
        ("raw", WeightRequest("raw")),
        ("phema:0.05", WeightRequest("phema", std=0.05)),
    ):
        assert WeightRequest.parse(text) == request and str(request) == text
        assert WeightRequest.parse(str(request)) == request and WeightRequest.parse(request) is request
    assert WeightRequest.parse(" EMA:0.99960 ") == WeightRequest("ema", decay=0.9996)
    assert WeightRequest.parse("ema") == DEFAULT_WEIGHTS
    assert (
        len({WeightRequest.parse(t) for t in ("ema", "ema", "ema:1", "ema:1.0")}) == 2
    )  # hashable, by value


@pytest.mark.parametrize("text", ["bogus", "", "raw:0.5", "phema", "ema:", "ema:x", "posthoc:0.05"])
def test_bad_syntax_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as error:
        WeightRequest.parse(text)
    assert str(error.value).startswith(f"weights {text!r}: ") and ACCEPTED_FORMS in str(error.value)


def test_out_of_range_numbers_say_the_range() -> None:
    with pytest.raises(ValueError, match=r"'ema:1\.5': an EMA decay lies in \[0, 1\], got 1\.5"):
        WeightRequest.parse("ema:1.5")
    with pytest.raises(ValueError, match=r"'phema:0\.5': a power-function EMA's std lies in \(0, 0\.2887\)"):
        WeightRequest.parse("phema:0.5")
    with pytest.raises(ValueError, match="a decay goes with ema"):
        WeightRequest("raw", decay=0.5)


def test_every_command_refuses_bad_syntax_naming_the_accepted_forms(capsys: pytest.CaptureFixture) -> None:
    for command in (
        ["sample", "--ckpt_path", "x.ckpt", "--out", "x.npz", "--weights", "ema:0.9x"],
        [
            "sweep",
            "--ckpt_path",
            "x",
            "--reference",
            "r",
            "--num_samples",
            "1",
            "--out",
            "o",
            "--weights",
            "emb",
        ],
        ["validate", "--ckpt_path", "x.ckpt", "--weights", "raw:1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            dip_main(command)
        assert exit_info.value.code == 2
        assert ACCEPTED_FORMS in capsys.readouterr().err, command[0]


# ---------------------------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> dict:
    """6 steps with EMA decays 0.5 (first) and 0.8, power-function EMA of std 0.1 and 0.2 with snapshots every
    2 steps, checkpoints every 3 steps."""
    tmp = tmp_path_factory.mktemp("weights")
    callbacks = [
        {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": DECAYS}},
        {
            "class_path": "dip_lightning.training.callbacks.PowerFunctionEMA",
            "init_args": {"stds": STDS, "snapshot_every_n_steps": EVERY},
        },
    ]
    extra = [
        HIGH_LR,
        f"--checkpoint.every_n_train_steps={CHECKPOINT_EVERY}",
        "--model.sampler.init_args.num_steps=2",
    ]
    fit_with(tiny_args(tmp / "run", demo_data, *extra, steps=STEPS, callbacks=callbacks))
    checkpoints = tmp / "run" / "checkpoints"
    assert sorted(p.name for p in (tmp / "run" / "phema").iterdir()) == [
        "phema-00000002.pt",
        "phema-00000004.pt",
        "phema-00000006.pt",
    ]
    return {"tmp": tmp, "run": tmp / "run", "last": checkpoints / "last.ckpt", "data": demo_data}


def reconstructed(run: dict, std: float, step: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"phema_{std}_{step}.ckpt"
    assert (
        dip_main(
            ["ema-reconstruct", str(run["run"]), "--std", str(std), "--step", str(step), "--out", str(out)]
        )
        == 0
    )
    return torch.load(out, map_location="cpu", weights_only=True)["state_dict"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_phema_is_what_ema_reconstruct_writes_at_the_latest_snapshot_step(run: dict, tmp_path: Path) -> None:
    """last.ckpt is at step 6: the snapshot of its own step; step00000003.ckpt: the snapshot of step 2."""
    last = read_checkpoint(run["last"])
    assert last["global_step"] == STEPS
    at_6 = reconstructed(run, 0.15, 6, tmp_path)
    assert_same(select_weights(last, run["last"], "phema:0.15"), at_6)
    assert weights_label(last, run["last"], "phema:0.15") == "phema std 0.15 at step 6"
    step3 = run["last"].with_name("step00000003.ckpt")
    at_2 = select_weights(read_checkpoint(step3), step3, "phema:0.15")
    assert weights_label(read_checkpoint(step3), step3, "phema:0.15") == "phema std 0.15 at step 2"
    assert_same(at_2, reconstructed(run, 0.15, 2, tmp_path))
    assert any(not torch.equal(at_2[k], at_6[k]) for k in at_6)
    # A preemption checkpoint lies in the run folder itself, beside <run>/phema.
    preempted = run["run"] / "hpc_ckpt_9.ckpt"
    shutil.copy(run["last"], preempted)
    assert_same(select_weights(read_checkpoint(preempted), preempted, "phema:0.15"), at_6)
    preempted.unlink()
    # A tracked std is reconstructed too (one rule), close to the profile the run tracked.
    tracked = torch.load(run["run"] / "phema" / "phema-00000006.pt", weights_only=True)["weights"]["0.1"]
    rebuilt = select_weights(last, run["last"], "phema:0.1")
    assert max(float((rebuilt[k].double() - tracked[k].double()).abs().max()) for k in tracked) < 1e-3

    # A reconstruction loads as itself: by default, and as the std it holds.
    file = tmp_path / "phema_0.15_6.ckpt"
    written = read_checkpoint(file)
    for request in ("ema", "phema:0.15"):
        assert_same(select_weights(written, file, request), at_6)
        assert weights_label(written, file, request) == "phema std 0.15 at step 6"
    with pytest.raises(CheckpointError, match=r"holds the phema std 0\.15 at step 6 .*ema-reconstruct"):
        select_weights(written, file, "phema:0.1")
    with pytest.raises(CheckpointError, match=r"no raw weights .*holds the phema std 0\.15 at step 6"):
        select_weights(written, file, "raw")


@pytest.mark.parametrize("text", ["ema", "ema:0.8", "raw", "phema:0.15"])
def test_each_kind_through_sample_and_validate(run: dict, tmp_path: Path, text: str) -> None:
    """``sample --weights`` exports what ``load_module(weights=)`` generates, and ``validate --weights`` runs the
    same weights; both say which in words."""
    expected = load_module(run["last"], weights=text)
    label = {"ema": "ema 0.5", "ema:0.8": "ema 0.8", "raw": "raw", "phema:0.15": "phema std 0.15 at step 6"}[
        text
    ]
    assert expected.loaded_weights == label
    checkpoint = read_checkpoint(run["last"])
    assert_same(expected.state_dict(), select_weights(checkpoint, run["last"], text))

    out = tmp_path / "samples.npz"
    flags = ["--num_samples", "4", "--batch_size", "4", "--out", str(out), "--weights", text]
    assert dip_main(["sample", "--ckpt_path", str(run["last"]), *flags]) == 0
    images = to_uint8(expected.generate(torch.arange(4), torch.arange(4))).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(out)["arr_0"], images)
    assert json.loads((tmp_path / "samples.npz.parts" / "job.json").read_text())["weights"] == label

    args = tiny_args(
        tmp_path / "validate", run["data"], "--trainer.limit_val_batches=1", f"--ckpt_path={run['last']}"
    )
    cli = DiPCLI(args=["validate", *args, f"--weights={text}"])
    assert cli.model.loaded_weights == label
    assert_same(cli.model.state_dict(), expected.state_dict())


def test_the_kinds_are_different_weights(run: dict) -> None:
    checkpoint = read_checkpoint(run["last"])
    chosen = {t: select_weights(checkpoint, run["last"], t) for t in ("ema", "ema:0.8", "raw", "phema:0.15")}
    for a in chosen:
        for b in chosen:
            if a < b:
                assert any(not torch.equal(chosen[a][k], chosen[b][k]) for k in chosen[a]), (a, b)
    assert_same(chosen["ema"], select_weights(checkpoint, run["last"], "ema:0.5"))


def test_an_untracked_decay_lists_the_tracked_ones(run: dict, capsys: pytest.CaptureFixture) -> None:
    checkpoint = read_checkpoint(run["last"])
    with pytest.raises(CheckpointError) as error:
        select_weights(checkpoint, run["last"], "ema:0.9")
    assert str(error.value) == (
        f"{run['last']} has no EMA of decay 0.9; it holds EMA decay(s) 0.5, 0.8, the raw weights and post-hoc EMA "
        "profiles of std 0.1, 0.2: choose one of --weights ema:0.5, ema:0.8."
    )


def test_phema_without_snapshots_says_how_to_get_them(run: dict, tmp_path: Path, demo_data: dict) -> None:
    # The run tracked profiles, but its checkpoint was copied away from its snapshots.
    moved = tmp_path / "elsewhere" / "last.ckpt"
    moved.parent.mkdir()
    shutil.copy(run["last"], moved)
    with pytest.raises(CheckpointError) as error:
        select_weights(read_checkpoint(moved), moved, "phema:0.15")
    message = str(error.value)
    assert message.startswith(f"{moved}: --weights phema:0.15 needs the run's post-hoc EMA snapshots")
    assert "ema-reconstruct THAT_FOLDER --std S --out CKPT" in message

    # A run that never tracked them: train with the callback.
    fit_with(tiny_args(tmp_path / "plain", demo_data, steps=1))
    plain = tmp_path / "plain" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as error:
        select_weights(read_checkpoint(plain), plain, "phema:0.05")
    message = str(error.value)
    assert "holds the weights of a run trained without the EMA callback" in message
    assert "train with dip_lightning.training.callbacks.PowerFunctionEMA in trainer.callbacks" in message

    # ... and asking a run without EMA for raw weights or a decay says what it holds and what works.
    assert weights_label(read_checkpoint(plain), plain) == "state_dict (no EMA)"
    for text, fix in (
        ("raw", "--weights ema gives this one's weights"),
        ("ema:0.9", "--weights ema gives its weights"),
    ):
        with pytest.raises(CheckpointError) as error:
            select_weights(read_checkpoint(plain), plain, text)
        assert str(plain) in str(error.value) and "trained without the EMA callback" in str(error.value)
        assert fix in str(error.value)


def test_phema_before_the_first_snapshot_is_an_error(run: dict, tmp_path: Path) -> None:
    checkpoint = dict(read_checkpoint(run["last"]), global_step=1)
    with pytest.raises(CheckpointError, match=r"at step 1, before the first snapshot .*\[2, 4, 6\]"):
        select_weights(checkpoint, run["last"], "phema:0.15")


def test_validate_weights_without_a_checkpoint_is_an_error(tmp_path: Path, demo_data: dict) -> None:
    args = tiny_args(tmp_path / "run", demo_data, "--trainer.limit_val_batches=1", "--weights=raw")
    with pytest.raises(ValueError, match="--weights chooses weights of a checkpoint: pass --ckpt_path too"):
        DiPCLI(args=["validate", *args])
