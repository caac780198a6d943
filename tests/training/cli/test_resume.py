"""Exact resume through the real CLI: interrupt, ``fit`` again, and end with the uninterrupted run's bits.

Runs are in-process where possible (fast), in subprocesses where a real kill is needed. What is compared: raw
weights, every EMA decay's weights (the first with its update count), optimizer state, and what every step saw
(step, epoch, batch index, labels), with ``torch.equal`` / exact equality (:mod:`tests.helpers.resume`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.io import PARTIAL_DIR
from dip_lightning.checkpoint.resume import resolve_resume
from dip_lightning.checkpoint.run_folder import RUN_LOCK
from dip_lightning.training.callbacks.preemption import PreemptionGuard
from tests.helpers.commands import run_process
from tests.helpers.resume import (
    STEPS,
    assert_equal_nested,
    assert_same_final,
    assert_same_steps,
    load_final,
    load_records,
    probe_args,
    resume_args,
    run_fit,
)
from tests.helpers.tiny import subprocess_env

pytestmark = pytest.mark.slow  # interrupted and resumed fits, each against an uninterrupted one


@pytest.fixture(scope="module")
def reference(demo_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run every resume test must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    stop, lines = run_fit(resume_args(root / "run", demo_data, *probe_args(root / "out")))
    assert stop is None
    assert "Resume: no checkpoint found; starting fresh." in lines
    return {"final": load_final(root / "out"), "records": load_records(root / "out")}


def _active_guard_installed() -> bool:
    for sig in (signal.SIGTERM, signal.SIGINT):
        owner = getattr(signal.getsignal(sig), "__self__", None)
        if isinstance(owner, PreemptionGuard) and owner._active:
            return True
    return False


def test_sigterm_mid_step_saves_then_fit_again_is_bit_exact(
    tmp_path: Path, demo_data: dict, reference: dict
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    # SIGTERM lands while the batch of step 17 is being trained; the guard saves after that step completes.
    stop, lines = run_fit(resume_args(run, demo_data, *probe_args(out, signal_at_step=17)))
    assert stop is not None and stop.signum == signal.SIGTERM and stop.code == 128 + signal.SIGTERM
    # It lands mid-step 17 or, on a loaded machine, a little later; the save is at the end of that step.
    assert not stop.requeued and 18 <= stop.step < STEPS
    hpc = run / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == stop.step
    # Periodic checkpoints (every 5 steps) are older: the preemption checkpoint must win. The save at the
    # preemption step itself never happens (training stops right after the preemption save).
    periodic = 5 * ((stop.step - 1) // 5)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == periodic
    # Nothing after the save: no extra last.ckpt, no train-end work, no final state.
    assert not (out / "final_rank0.pt").exists()
    assert not _active_guard_installed()  # after fit, signals behave as before it

    saved = stop.step
    stop, lines = run_fit(resume_args(run, demo_data, *probe_args(out)))
    assert stop is None
    assert f"Resume: from preemption checkpoint {hpc} (step {saved})." in lines
    assert_same_final(load_final(out), reference["final"])
    assert_same_steps(load_records(out), reference["records"])


def test_ctrl_c_then_resume_with_other_num_workers_is_bit_exact(
    tmp_path: Path, demo_data: dict, reference: dict
) -> None:
    """SIGINT (Ctrl-C) saves like SIGTERM; the resumed run loads data in a worker process instead of
    in-process (num_workers 0 -> 1) and sees the same stream."""
    run, out = tmp_path / "run", tmp_path / "out"
    stop, _ = run_fit(resume_args(run, demo_data, *probe_args(out, signal_at_step=8, signal_name="SIGINT")))
    assert stop is not None and stop.signum == signal.SIGINT and stop.code == 130 and 9 <= stop.step < STEPS
    saved = stop.step
    stop, lines = run_fit(resume_args(run, demo_data, "--data.init_args.num_workers=1", *probe_args(out)))
    assert stop is None
    assert any("Resume: from preemption checkpoint" in line and f"(step {saved})" in line for line in lines)
    assert_same_steps(load_records(out), reference["records"])
    assert_same_final(load_final(out), reference["final"])


def test_resume_with_two_workers_one_starting_late_is_bit_exact(
    tmp_path: Path, demo_data: dict, reference: dict
) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    stop, _ = run_fit(resume_args(run, demo_data, *probe_args(out, signal_at_step=8)))
    assert stop is not None
    late = probe_args(out, late_worker=1)
    stop, _ = run_fit(resume_args(run, demo_data, "--data.init_args.num_workers=2", *late))
    assert stop is None
    assert_same_steps(load_records(out), reference["records"])
    assert_same_final(load_final(out), reference["final"])


def test_kill_9_during_a_checkpoint_save_keeps_previous_checkpoint(
    tmp_path: Path, demo_data: dict, reference: dict
) -> None:
    """SIGKILL in the middle of writing last.ckpt: the old last.ckpt stays whole; the next fit takes over the
    killed one's hold of the run folder and resumes from the newest complete checkpoint, step00000010.ckpt."""
    run, out, marker = tmp_path / "run", tmp_path / "out", tmp_path / "stalled"
    # Saves: 1 step00000005.ckpt, 2 last.ckpt (step 5), 3 step00000010.ckpt, 4 last.ckpt (step 10) <- stalls.
    plugin = json.dumps(
        [
            {
                "class_path": "tests.helpers.dip_probe.SlowSaveCheckpointIO",
                "init_args": {"marker": str(marker), "stall_save": 4},
            }
        ]
    )
    args = resume_args(run, demo_data, f"--trainer.plugins={plugin}", *probe_args(out))
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dip_lightning", "fit", *args],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the stalled save never started"
            time.sleep(0.1)
        proc.kill()  # SIGKILL while last.ckpt is half written
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    partial = Path(marker.read_text().strip())
    assert partial.parent == run / "checkpoints" / PARTIAL_DIR and partial.name.startswith(".last.ckpt.")
    assert partial.exists()  # the half-written temporary file
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5  # the previous, complete last.ckpt
    assert (run / "checkpoints" / "step00000010.ckpt").exists()

    stop, lines = run_fit(resume_args(run, demo_data, *probe_args(out)))
    assert stop is None
    assert any("unfinished checkpoint file" in line for line in lines)
    assert not partial.exists()
    hold = next(line for line in lines if line.startswith("Run folder: held by"))
    assert f"Took over from a fit (pid {proc.pid} on " in hold and f"process {proc.pid} on " in hold, hold
    assert "has ended" in hold
    assert (
        f"Resume: from step checkpoint {run / 'checkpoints' / 'step00000010.ckpt'} (step 10). "
        "Ignored: last.ckpt (stale: step 5 is behind step00000010.ckpt at step 10)."
    ) in lines
    assert_same_final(load_final(out), reference["final"])


def test_stale_preemption_checkpoint_of_an_older_job_is_ignored_then_pruned(
    tmp_path: Path, demo_data: dict, reference: dict
) -> None:
    """Job A trains to 10; an old job's hpc_ckpt at step 5 lies around; B resumes from last.ckpt (10), not 5.

    B is then preempted (hpc_ckpt_2 written, hpc_ckpt_1 pruned) and C finishes from hpc_ckpt_2: three jobs,
    two interruptions, and a larger max_steps on resume, still the reference's bits.
    """
    run, out = tmp_path / "run", tmp_path / "out"
    stop, _ = run_fit(resume_args(run, demo_data, *probe_args(out), steps=10))
    assert stop is None
    stale = run / "hpc_ckpt_1.ckpt"
    stale.write_bytes((run / "checkpoints" / "step00000005.ckpt").read_bytes())

    decision = resolve_resume(run)
    assert decision.path == run / "checkpoints" / "last.ckpt" and decision.step == 10
    assert decision.ignored and decision.ignored[0][0] == stale

    stop, lines = run_fit(resume_args(run, demo_data, *probe_args(out, signal_at_step=21)))
    assert stop is not None and 22 <= stop.step < STEPS
    saved = stop.step
    resume_line = next(line for line in lines if line.startswith("Resume:"))
    assert "from last checkpoint" in resume_line and "(step 10)" in resume_line
    assert "hpc_ckpt_1.ckpt (stale: step 5 is behind last.ckpt at step 10)" in resume_line
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_2.ckpt"]

    stop, lines = run_fit(resume_args(run, demo_data, *probe_args(out)))
    assert stop is None
    assert f"Resume: from preemption checkpoint {run / 'hpc_ckpt_2.ckpt'} (step {saved})." in lines
    assert_same_final(load_final(out), reference["final"])
    assert_same_steps(load_records(out), reference["records"])


def test_ddp_two_processes_sigterm_on_one_rank_resumes_bit_exact(tmp_path: Path, demo_data: dict) -> None:
    """Two gloo processes (Lightning's launcher, no SLURM): SIGTERM reaches rank 0 only; both ranks agree
    on the step, save once and stop; `fit` again gives the uninterrupted two-process run's bits on both ranks.
    """
    env = subprocess_env()

    def fit_ddp(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        args = resume_args(run, demo_data, "--trainer.devices=2", "--trainer.strategy=ddp", *probe_args(out))
        cmd = [sys.executable, "-m", "dip_lightning", "fit", *args, *extra]
        return run_process(cmd, cwd=tmp_path, env=env, timeout=600)

    ref = fit_ddp(tmp_path / "ref", tmp_path / "ref_out")
    assert ref.returncode == 0, ref.stderr[-3000:]
    run, out = tmp_path / "run", tmp_path / "out"
    first = fit_ddp(
        run,
        out,
        "--trainer.callbacks.init_args.signal_at_step=13",
        "--trainer.callbacks.init_args.signal_rank=0",
    )
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert 14 <= torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] < STEPS
    assert not (run / RUN_LOCK).exists()  # released on the signal's exit
    # A damaged last.ckpt (older than the preemption checkpoint) is set aside by rank 0 before rank 1 starts.
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    second = fit_ddp(run, out)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stderr + second.stdout
    assert "Resume: from preemption checkpoint" in log and "Set aside as damaged: last.ckpt -> " in log
    # Rank 0 held the run folder; rank 1 (started by Lightning's launcher) found its job's token there.
    assert log.count("Run folder: held by a fit") == 1 and "RunFolderBusy" not in log
    assert not (run / RUN_LOCK).exists()
    for rank in (0, 1):
        got, want = load_final(out, rank), load_final(tmp_path / "ref_out", rank)
        assert_same_final(got, want)
        assert load_records(out, rank) == load_records(tmp_path / "ref_out", rank)
    # Every rank holds the same averages (each computes them from the same all-reduced weights).
    rank0, rank1 = load_final(out, 0), load_final(out, 1)
    for key in ("raw", "ema", "further_emas"):
        assert_equal_nested(rank0[key], rank1[key], key)
    assert load_records(out, 0) != load_records(out, 1)  # the ranks saw different data
