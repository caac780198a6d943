"""DiP training on a real SLURM cluster: preempted (USR1), requeued, resumed, bit-identical to no preemption; a
requeued job that takes over the hold its killed first run left on the run folder.

The job is ``tests/helpers/slurm_assets/dip_fit.sbatch`` running ``srun python -m dip_lightning fit --config
experiments/tiny_cpu.yaml`` (small overrides, the embedded demo dataset), as a user would submit it. The test
waits until training runs, sends ``scancel -s USR1`` (what ``--signal=USR1@N`` does before a time limit), and
checks: the job saved a preemption checkpoint and requeued itself (``SLURM_RESTART_COUNT=1``), the requeued
job resumed at the saved step on every rank and completed, and its final raw weights, EMA weights, optimizer
state and the batches of every step equal those of an uninterrupted run of the same config outside SLURM.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from dip_lightning.checkpoint.run_folder import RUN_LOCK
from tests.helpers import REPO
from tests.helpers.resume import STEPS, probe_args, resume_args
from tests.helpers.slurm_cluster import TERMINAL_STATES, SlurmCluster, free_port
from tests.helpers.slurm_preemption import (
    ReferenceProcess,
    check_dip_resumed,
    check_resumed_once,
    preempt_and_resume,
    report,
)
from tests.helpers.tiny import subprocess_env, tiny_args

pytestmark = pytest.mark.slurm

SBATCH = REPO / "tests" / "helpers" / "slurm_assets" / "dip_fit.sbatch"
CRASH_SBATCH = REPO / "tests" / "helpers" / "slurm_assets" / "dip_fit_crash.sbatch"


def _fit_args(run: Path, out: Path, data: dict, devices: int, **probe: object) -> list[str]:
    ddp = ["--trainer.strategy=ddp"] if devices > 1 else []
    args = resume_args(run, data, f"--trainer.devices={devices}", "--trainer.num_nodes=1", *ddp)
    return args + probe_args(out, **probe)


def _preempt_and_resume(cluster: SlurmCluster, tmp_path: Path, data: dict, devices: int) -> dict[str, float]:
    run, out, log_path = tmp_path / "run", tmp_path / "out", tmp_path / "job.out"
    # step_sleep stretches the job so that USR1 lands at a random point mid-training; hold_at_step is only a
    # backstop for a starved machine (the first job waits there until the signal came, so it cannot finish).
    args = _fit_args(run, out, data, devices, progress_every=5, step_sleep=0.15, hold_at_step=20)
    args_file = tmp_path / "fit_args.txt"
    args_file.write_text("\n".join(args) + "\n")
    env = {
        "DIP_PYTHON": sys.executable,
        "DIP_ARGS_FILE": str(args_file),
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": subprocess_env()["PYTHONPATH"],
    }
    # The same training, uninterrupted and outside SLURM (Lightning launches the DDP ranks itself).
    reference_out = tmp_path / "reference_out"
    fit = _fit_args(tmp_path / "reference_run", reference_out, data, devices)
    cmd = [sys.executable, "-m", "dip_lightning", "fit", *fit]

    t0 = time.monotonic()
    job = cluster.sbatch(SBATCH, tmp_path, f"--ntasks-per-node={devices}", f"--output={log_path}", env=env)
    with ReferenceProcess(cmd, tmp_path, subprocess_env(threads=1), timeout=300) as reference:
        trip = preempt_and_resume(
            cluster, job, log_path, run, reference, ranks=devices, signal_after_step=5, submitted_at=t0
        )
    log = trip.log

    # SLURM: requeued once by the job itself, seen by the job; the final srun succeeded.
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    assert log.rstrip().endswith("SRUN EXIT rc=0"), log[-4000:]
    # Resume: every rank continued at the step stored in the preemption checkpoint, chosen automatically.
    check_resumed_once(cluster, trip, ranks=devices, first_step=5, steps=STEPS)
    # Bit for bit the uninterrupted run, on every rank: weights, EMA, optimizer, and the data of every step.
    check_dip_resumed(trip, out, reference_out, ranks=devices)
    return {**trip.timings, "saved_step": trip.saved_step}


def test_dip_fit_preempted_requeued_resumed_single_task(
    slurm_cluster: SlurmCluster, tmp_path: Path, demo_data: dict
) -> None:
    report("dip 1 task", _preempt_and_resume(slurm_cluster, tmp_path, demo_data, devices=1))


@pytest.mark.slow
def test_dip_fit_preempted_requeued_resumed_ddp_two_tasks(
    slurm_cluster: SlurmCluster, tmp_path: Path, demo_data: dict
) -> None:
    report("dip 2 tasks ddp", _preempt_and_resume(slurm_cluster, tmp_path, demo_data, devices=2))


def test_requeued_job_takes_over_the_hold_its_killed_run_left(
    slurm_cluster: SlurmCluster, tmp_path: Path, demo_data: dict
) -> None:
    """The first run of the job is killed -9 while its fit holds the run folder (no release), and the job requeues
    itself: the requeued run (same SLURM job id) takes the hold over at once and trains to the end."""
    run, log_path, args_file = tmp_path / "run", tmp_path / "job.out", tmp_path / "fit_args.txt"
    args_file.write_text("\n".join(tiny_args(run, demo_data, steps=2)) + "\n")
    env = {
        "DIP_PYTHON": sys.executable,
        "DIP_ARGS_FILE": str(args_file),
        "DIP_RUN_DIR": str(run),
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": subprocess_env()["PYTHONPATH"],
    }
    job = slurm_cluster.sbatch(CRASH_SBATCH, tmp_path, f"--output={log_path}", env=env)
    try:
        slurm_cluster.wait_for_restart(job, 1, timeout=240)
        slurm_cluster.release_pending_now(job)
        slurm_cluster.wait_for_state(job, "COMPLETED", timeout=300)
    finally:
        if slurm_cluster.job_state(job) not in TERMINAL_STATES:
            slurm_cluster.scancel(job)
    log = log_path.read_text()
    assert "HOLDER KILLED rc=137" in log, log[-4000:]
    # The killed run's own "held by" line may never be printed: the script kills it as soon as run.lock has
    # content, which can be before the line is logged. The requeued run's line names the hold it took over.
    holds = [line for line in log.splitlines() if "Run folder: held by" in line]
    assert 1 <= len(holds) <= 2 and all(f"SLURM job {job} (pid " in line for line in holds), log[-4000:]
    killed_pid = re.search(r"(\d+) Killed", log)
    took_over = f"Took over from SLURM job {job} (pid {killed_pid.group(1) if killed_pid else '?'} "
    assert took_over in holds[-1], log[-4000:]
    assert f"this job's own earlier run (SLURM job {job}, requeued or restarted)" in holds[-1], holds[-1]
    assert log.rstrip().endswith("SRUN EXIT rc=0"), log[-4000:]
    assert not (run / RUN_LOCK).exists() and len(list(run.glob(f"{RUN_LOCK}.taken-*"))) == 1
