"""The SLURM harness drives a real Lightning job through preemption, requeue and resume.

Real daemons and commands (sbatch, srun, scancel -s USR1, scontrol requeue from inside Lightning). The trained
module is a tiny regression in ``tests/helpers/slurm_assets/boring_fit.py``, so this test does not depend on the rest of
the package. The preempted-and-resumed run must end with exactly the weights of an uninterrupted run: the
data is a pure function of the step and signals are taken at step boundaries (see that script's docstring).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.slurm_cluster import SlurmCluster, free_port
from tests.helpers.slurm_preemption import (
    Patience,
    ReferenceProcess,
    check_resumed_once,
    preempt_and_resume,
    report,
)

pytestmark = pytest.mark.slurm

ASSET = Path(__file__).resolve().parents[1] / "helpers" / "slurm_assets" / "boring_fit.py"
# The boring fit starts in seconds: tighter bounds than the DiP jobs'.
PATIENCE = Patience(started=120, progress=60, requeued=60, running=60, resumed=120, completed=240)


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
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1 MASTER_PORT={free_port()}
srun --kill-on-bad-exit=1 {cmd}
rc=$?
echo "SRUN EXIT rc=$rc"
exit $rc
"""


def _preempt_and_resume(
    cluster: SlurmCluster, tmp_path: Path, *, devices: int, max_steps: int, step_sleep: float
) -> dict[str, float]:
    """Submit, preempt with USR1 mid-training, requeue, resume, finish; check every stage; return timings."""
    out, root, weights = tmp_path / "job.out", tmp_path / "run", tmp_path / "slurm_weights.pt"
    script = _batch_script(out, root, weights, devices=devices, max_steps=max_steps, step_sleep=step_sleep)
    # The uninterrupted run of the same script outside SLURM (no SLURM_* in its environment).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    reference_weights = tmp_path / "reference_weights.pt"
    cmd = [sys.executable, str(ASSET), str(tmp_path / "reference_run"), str(reference_weights)]
    cmd += ["--max-steps", str(max_steps), "--devices", str(devices)]

    t0 = time.monotonic()
    job = cluster.sbatch(script, cwd=tmp_path)
    with ReferenceProcess(cmd, tmp_path, env, timeout=PATIENCE.completed) as reference:
        trip = preempt_and_resume(
            cluster,
            job,
            out,
            root,
            reference,
            ranks=devices,
            signal_after_step=100,
            submitted_at=t0,
            patience=PATIENCE,
        )
    log = trip.log

    # SLURM side: the requeue seen by the job itself; the final srun succeeded.
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-3000:]
    assert log.rstrip().endswith("SRUN EXIT rc=0"), log[-3000:]
    # Lightning side: every rank resumed at exactly the step stored in the preemption checkpoint.
    check_resumed_once(cluster, trip, ranks=devices, first_step=100, steps=max_steps)
    assert f"WEIGHTS SAVED global_step={max_steps}" in log

    # Same weights as the uninterrupted run, bit for bit.
    got = torch.load(weights, map_location="cpu", weights_only=True)
    want = torch.load(reference_weights, map_location="cpu", weights_only=True)
    assert got["global_step"] == want["global_step"] == max_steps
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for name, tensor in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), f"{name} differs after preempt + resume"
    return {**trip.timings, "saved_step": trip.saved_step}


def _report(name: str, cluster: SlurmCluster, timings: dict[str, float]) -> None:
    report(name, {**timings, **{f"cluster_{k}": v for k, v in cluster.timings.items()}})


def test_preempt_requeue_resume_single_task(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    timings = _preempt_and_resume(slurm_cluster, tmp_path, devices=1, max_steps=1000, step_sleep=0.01)
    _report("1 task", slurm_cluster, timings)


def test_preempt_requeue_resume_ddp_two_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    timings = _preempt_and_resume(slurm_cluster, tmp_path, devices=2, max_steps=600, step_sleep=0.01)
    _report("2 tasks ddp", slurm_cluster, timings)
