"""DiP training on a real SLURM cluster: preempted (USR1), requeued, resumed, bit-identical to no preemption.

The job is ``tests/helpers/slurm_assets/dip_fit.sbatch`` running ``srun python -m dip_lightning fit --config
experiments/tiny_cpu.yaml`` (small overrides, the embedded demo dataset), as a user would submit it. The test
waits until training runs, sends ``scancel -s USR1`` (what ``--signal=USR1@N`` does before a time limit), and
checks: the job saved a preemption checkpoint and requeued itself (``SLURM_RESTART_COUNT=1``), the requeued
job resumed at the saved step on every rank and completed, and its final raw weights, EMA weights, optimizer
state and the batches of every step equal those of an uninterrupted run of the same config outside SLURM.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.resume import (
    STEPS,
    assert_same_final,
    load_final,
    load_records,
    probe_args,
    resume_args,
)
from tests.helpers.slurm_cluster import TERMINAL_STATES, SlurmCluster
from tests.helpers.tiny import REPO, subprocess_env

pytestmark = pytest.mark.slurm

SBATCH = REPO / "tests" / "helpers" / "slurm_assets" / "dip_fit.sbatch"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fit_args(run: Path, out: Path, data: dict, devices: int, **probe: object) -> list[str]:
    ddp = ["--trainer.strategy=ddp"] if devices > 1 else []
    args = resume_args(run, data, f"--trainer.devices={devices}", "--trainer.num_nodes=1", *ddp)
    return args + probe_args(out, **probe)


def _start_reference(tmp_path: Path, data: dict, devices: int) -> tuple[subprocess.Popen[bytes], Path]:
    """The same training, uninterrupted and outside SLURM (Lightning launches the DDP ranks itself)."""
    out = tmp_path / "reference_out"
    log = (tmp_path / "reference.log").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "dip_lightning",
        "fit",
        *_fit_args(tmp_path / "reference_run", out, data, devices),
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=subprocess_env(threads=1), stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return proc, out


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
        "MASTER_PORT": str(_free_port()),
        "PYTHONPATH": subprocess_env()["PYTHONPATH"],
    }

    t0 = time.monotonic()
    job = cluster.sbatch(SBATCH, tmp_path, f"--ntasks-per-node={devices}", f"--output={log_path}", env=env)
    reference: subprocess.Popen[bytes] | None = None
    try:
        # Signal once the guard is installed and steps run: before that, USR1 would kill python (exit 138).
        cluster.wait_for_file_text(log_path, "TRAINING STARTED", timeout=180, count=devices)
        cluster.wait_for_file_text(log_path, "PROGRESS global_step=5", timeout=120)
        t_signal = time.monotonic()
        cluster.scancel(job, signal="USR1")

        cluster.wait_for_restart(job, 1, timeout=120)
        t_requeued = time.monotonic()
        hpc = run / "hpc_ckpt_1.ckpt"
        assert hpc.is_file(), f"no preemption checkpoint in {run}: {sorted(os.listdir(run))}"
        cluster.release_pending_now(job, timeout=60)
        cluster.wait_for_state(job, "RUNNING", timeout=60)
        cluster.wait_for_file_text(log_path, "restart_count=1", timeout=180, count=devices)
        t_resumed = time.monotonic()
        # Started now, while the resumed job mostly sleeps between steps (imports of both would compete).
        reference, reference_out = _start_reference(tmp_path, data, devices)
        cluster.wait_for_state(job, "COMPLETED", timeout=300)
        t_done = time.monotonic()
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-4000:]
    finally:
        if reference is not None and reference.poll() is None:
            reference.kill()
            reference.wait()
        if cluster.job_state(job) not in TERMINAL_STATES:  # a failed check must not leave the job running
            cluster.scancel(job)
    log = log_path.read_text()

    # SLURM: requeued once by the job itself, seen by the job; the final srun succeeded.
    assert cluster.restart_count(job) == 1
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    assert "SLURM detected: auto-requeue on SIGUSR1." in log
    assert "Preemption: requeued SLURM job" in log, log[-4000:]
    # Lightning's own handlers stayed out: no save inside a signal handler, no "bypassed" SIGTERM.
    assert "Handling auto-requeue signal" not in log and "Bypassing SIGTERM" not in log, log[-4000:]
    assert log.rstrip().endswith("SRUN EXIT rc=0"), log[-4000:]

    # Resume: every rank continued at the step stored in the preemption checkpoint, chosen automatically.
    saved_step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 5 <= saved_step < STEPS
    assert f"Resume: from preemption checkpoint {hpc} (step {saved_step})." in log, log[-4000:]
    resumed = re.findall(r"TRAINING STARTED rank=(\d+) global_step=(\d+) restart_count=1", log)
    assert sorted(int(rank) for rank, _ in resumed) == list(range(devices)), log[-4000:]
    assert {int(step) for _, step in resumed} == {saved_step}, log[-4000:]
    assert sorted(p.name for p in run.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]

    # Bit for bit the uninterrupted run, on every rank: weights, EMA, optimizer, and the data of every step.
    for rank in range(devices):
        assert_same_final(load_final(out, rank), load_final(reference_out, rank))
        assert load_records(out, rank) == load_records(reference_out, rank)
    if devices > 1:
        assert load_records(out, 0) != load_records(out, 1)

    return {
        "to_signal_s": t_signal - t0,
        "signal_to_requeued_s": t_requeued - t_signal,
        "requeued_to_resumed_s": t_resumed - t_requeued,
        "resumed_to_done_s": t_done - t_resumed,
        "round_trip_s": t_done - t0,
        "saved_step": saved_step,
    }


def _report(name: str, timings: dict[str, float]) -> None:
    parts = [f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in timings.items()]
    print(f"[slurm dip {name}] " + " ".join(parts))


def test_dip_fit_preempted_requeued_resumed_single_task(
    slurm_cluster: SlurmCluster, tmp_path: Path, demo_data: dict
) -> None:
    _report("1 task", _preempt_and_resume(slurm_cluster, tmp_path, demo_data, devices=1))


@pytest.mark.slow
def test_dip_fit_preempted_requeued_resumed_ddp_two_tasks(
    slurm_cluster: SlurmCluster, tmp_path: Path, demo_data: dict
) -> None:
    _report("2 tasks ddp", _preempt_and_resume(slurm_cluster, tmp_path, demo_data, devices=2))
