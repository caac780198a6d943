"""The SLURM harness drives a real Lightning job through preemption, requeue and resume.

Real daemons and commands (sbatch, srun, scancel -s USR1, scontrol requeue from inside Lightning). The trained
module is a tiny regression in ``tests/helpers/slurm_assets/boring_fit.py``, so this test does not depend on the rest of
the package. The preempted-and-resumed run must end with exactly the weights of an uninterrupted run: the
data is a pure function of the step and signals are taken at step boundaries (see that script's docstring).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.slurm_cluster import TERMINAL_STATES, SlurmCluster

pytestmark = pytest.mark.slurm

ASSET = Path(__file__).resolve().parents[1] / "helpers" / "slurm_assets" / "boring_fit.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batch_script(
    out: Path, root: Path, weights: Path, *, devices: int, max_steps: int, step_sleep: float
) -> str:
    """The job as a cluster user would write it: srun (signals reach srun tasks only), requeue, append."""
    q = shlex.quote
    cmd = (
        f"{q(sys.executable)} {q(str(ASSET))} {q(str(root))} {q(str(weights))} "
        f"--max-steps {max_steps} --devices {devices} --step-sleep {step_sleep}"
    )
    # MASTER_PORT: Lightning's SLURM default (15000 + job id digits) collides between clusters whose job ids
    # all start at 1 (parallel test sessions); an explicit free port does not.
    return f"""#!/bin/bash
#SBATCH --job-name=boring-fit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={devices}
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}
echo "BATCH START job=$SLURM_JOB_ID SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT:-0}}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1 MASTER_PORT={_free_port()}
srun --kill-on-bad-exit=1 {cmd}
rc=$?
echo "SRUN EXIT rc=$rc"
exit $rc
"""


def _start_reference(tmp_path: Path, *, devices: int, max_steps: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Uninterrupted run of the same script outside SLURM (no SLURM_* in its environment), in background."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    weights = tmp_path / "reference_weights.pt"
    log = (tmp_path / "reference.log").open("wb")
    cmd = [sys.executable, str(ASSET), str(tmp_path / "reference_run"), str(weights)]
    cmd += ["--max-steps", str(max_steps), "--devices", str(devices)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    log.close()
    return proc, weights


def _preempt_and_resume(
    cluster: SlurmCluster, tmp_path: Path, *, devices: int, max_steps: int, step_sleep: float
) -> dict[str, float]:
    """Submit, preempt with USR1 mid-training, requeue, resume, finish; check every stage; return timings."""
    out, root, weights = tmp_path / "job.out", tmp_path / "run", tmp_path / "slurm_weights.pt"
    script = _batch_script(out, root, weights, devices=devices, max_steps=max_steps, step_sleep=step_sleep)

    t0 = time.monotonic()
    job = cluster.sbatch(script, cwd=tmp_path)
    reference: subprocess.Popen[bytes] | None = None
    try:
        # Signal only once Lightning's handler is installed (on_train_start runs after it) and steps were
        # taken: without a handler, USR1 kills python (exit 138) instead of requeueing.
        cluster.wait_for_file_text(out, "TRAINING STARTED", timeout=120, count=devices)
        cluster.wait_for_file_text(out, "PROGRESS global_step=100", timeout=60)
        t_signal = time.monotonic()
        cluster.scancel(job, signal="USR1")

        cluster.wait_for_restart(job, 1, timeout=60)
        t_requeued = time.monotonic()
        hpc = root / "hpc_ckpt_1.ckpt"
        assert hpc.is_file(), f"no preemption checkpoint in {root}: {sorted(os.listdir(root))}"
        cluster.release_pending_now(job, timeout=60)
        t_released = time.monotonic()
        cluster.wait_for_state(job, "RUNNING", timeout=60)
        t_running = time.monotonic()
        cluster.wait_for_file_text(out, "restart_count=1", timeout=120, count=devices)
        t_resumed = time.monotonic()
        # The uninterrupted reference runs now, while the resumed job mostly sleeps between steps: started
        # earlier, its ~8 s of imports would slow down the job's own start-ups on a 2-core machine.
        reference, reference_weights = _start_reference(tmp_path, devices=devices, max_steps=max_steps)
        cluster.wait_for_state(job, "COMPLETED", timeout=240)
        t_done = time.monotonic()
        assert reference.wait(timeout=240) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        if reference is not None and reference.poll() is None:
            reference.kill()
            reference.wait()
        # A failed check must not leave the job holding the CPUs.
        if cluster.job_state(job) not in TERMINAL_STATES:
            cluster.scancel(job)
    log = out.read_text()

    # SLURM side: one requeue, seen by the job itself; the final srun succeeded.
    assert cluster.restart_count(job) == 1
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-3000:]
    assert log.rstrip().endswith("SRUN EXIT rc=0"), log[-3000:]

    # Lightning side: every rank resumed at exactly the step stored in the preemption checkpoint.
    saved_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert 100 <= saved_step < max_steps
    resumed = re.findall(r"TRAINING STARTED rank=(\d+) global_step=(\d+) restart_count=1", log)
    assert sorted(int(rank) for rank, _ in resumed) == list(range(devices)), log[-3000:]
    assert {int(step) for _, step in resumed} == {saved_step}, log[-3000:]
    assert sorted(p.name for p in root.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert f"WEIGHTS SAVED global_step={max_steps}" in log

    # Same weights as the uninterrupted run, bit for bit.
    got = torch.load(weights, map_location="cpu", weights_only=True)
    want = torch.load(reference_weights, map_location="cpu", weights_only=True)
    assert got["global_step"] == want["global_step"] == max_steps
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), f"{name} differs after preempt + resume"

    return {
        "to_signal_s": t_signal - t0,
        "signal_to_requeued_s": t_requeued - t_signal,
        "requeued_to_pending_released_s": t_released - t_requeued,
        "released_to_running_s": t_running - t_released,
        "running_to_resumed_s": t_resumed - t_running,
        "resumed_to_done_s": t_done - t_resumed,
        "round_trip_s": t_done - t0,
        "saved_step": saved_step,
    }


def _report(name: str, cluster: SlurmCluster, timings: dict[str, float]) -> None:
    parts = [f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in timings.items()]
    cluster_parts = [f"cluster_{k}={v:.1f}" for k, v in cluster.timings.items()]
    print(f"[slurm {name}] " + " ".join(parts + cluster_parts))


def test_preempt_requeue_resume_single_task(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    timings = _preempt_and_resume(slurm_cluster, tmp_path, devices=1, max_steps=1000, step_sleep=0.01)
    _report("1 task", slurm_cluster, timings)


def test_preempt_requeue_resume_ddp_two_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    timings = _preempt_and_resume(slurm_cluster, tmp_path, devices=2, max_steps=600, step_sleep=0.01)
    _report("2 tasks ddp", slurm_cluster, timings)
