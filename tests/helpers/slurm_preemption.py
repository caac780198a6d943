"""The preempt-and-resume round trip every SLURM test shares, one node or two, DiP or the harness's boring fit.

A running job gets ``scancel -s USR1`` (what ``--signal=USR1@N`` does before a time limit), saves a preemption
checkpoint, requeues itself and resumes on every rank; an uninterrupted reference run starts once the job
resumed (started earlier, its imports would slow down the job's own start-ups on a 2-core machine) and must
complete too. :func:`check_resumed_once` holds the checks every such job must pass, :func:`check_dip_resumed`
those of a DiP ``fit`` (its log lines, bit-exact final state against the reference).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch

from tests.helpers.resume import assert_same_final, load_final, load_records
from tests.helpers.slurm_cluster import TERMINAL_STATES, SlurmCluster

HPC_CHECKPOINT = "hpc_ckpt_1.ckpt"  # Lightning's name for the first preemption checkpoint of a run folder


class Reference(Protocol):
    """The uninterrupted run that the preempted one is compared with."""

    def start(self) -> None: ...

    def wait(self) -> None:
        """Return once the run completed; fail (with its log) if it did not."""


class ReferenceProcess:
    """A reference run as a local process outside SLURM (Lightning launches DDP ranks itself); killed on exit if
    it still runs, so a failed check leaves nothing behind."""

    def __init__(self, cmd: Sequence[str], cwd: Path, env: Mapping[str, str], *, timeout: float) -> None:
        self.cmd, self.cwd, self.env, self.timeout = list(cmd), cwd, dict(env), timeout
        self.log = cwd / "reference.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait(self) -> None:
        assert self.proc is not None, "reference run never started"
        assert self.proc.wait(timeout=self.timeout) == 0, self.log.read_text()[-4000:]

    def __enter__(self) -> ReferenceProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Patience:
    """Seconds each stage of the round trip may take before the test fails."""

    started: float = 180.0  # from submission until every rank printed TRAINING STARTED
    progress: float = 120.0  # then until the step after which USR1 is sent
    requeued: float = 120.0  # from the signal until SLURM counts the requeue
    running: float = 60.0  # each: until PENDING is released, until the job runs again
    resumed: float = 180.0  # until every rank printed its resumed TRAINING STARTED
    completed: float = 300.0  # until the job completed


@dataclass
class RoundTrip:
    """What a preempted, requeued and resumed job left: its log, its preemption checkpoint and the stage times."""

    job: int
    log: str
    checkpoint: Path
    saved_step: int
    timings: dict[str, float] = field(default_factory=dict)


def preempt_and_resume(
    cluster: SlurmCluster,
    job: int,
    log_path: Path,
    run_dir: Path,
    reference: Reference,
    *,
    ranks: int,
    signal_after_step: int,
    submitted_at: float,
    patience: Patience = Patience(),
) -> RoundTrip:
    """Signal ``job`` (submitted at ``submitted_at``, ``time.monotonic()``) once it reached
    ``signal_after_step``, follow it through requeue and resume to completion, and wait for ``reference``
    (started once the job resumed). A failed check never leaves the job running."""
    try:
        # Signal once the guard is installed and steps run: before that, USR1 would kill python (exit 138).
        cluster.wait_for_file_text(log_path, "TRAINING STARTED", timeout=patience.started, count=ranks)
        cluster.wait_for_file_text(log_path, f"PROGRESS global_step={signal_after_step}", patience.progress)
        t_signal = time.monotonic()
        cluster.scancel(job, signal="USR1")

        cluster.wait_for_restart(job, 1, timeout=patience.requeued)
        t_requeued = time.monotonic()
        checkpoint = run_dir / HPC_CHECKPOINT
        assert checkpoint.is_file(), f"no preemption checkpoint in {run_dir}: {sorted(run_dir.iterdir())}"
        cluster.release_pending_now(job, timeout=patience.running)
        t_released = time.monotonic()
        cluster.wait_for_state(job, "RUNNING", timeout=patience.running)
        t_running = time.monotonic()
        cluster.wait_for_file_text(log_path, "restart_count=1", timeout=patience.resumed, count=ranks)
        t_resumed = time.monotonic()
        reference.start()  # now, while the resumed job mostly sleeps between steps
        cluster.wait_for_state(job, "COMPLETED", timeout=patience.completed)
        t_done = time.monotonic()
        reference.wait()
    finally:
        if cluster.job_state(job) not in TERMINAL_STATES:
            cluster.scancel(job)
    saved_step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    timings = {
        "to_signal_s": t_signal - submitted_at,
        "signal_to_requeued_s": t_requeued - t_signal,
        "requeued_to_pending_released_s": t_released - t_requeued,
        "released_to_running_s": t_running - t_released,
        "running_to_resumed_s": t_resumed - t_running,
        "resumed_to_done_s": t_done - t_resumed,
        "round_trip_s": t_done - submitted_at,
    }
    return RoundTrip(job, log_path.read_text(), checkpoint, saved_step, timings)


def resumed_ranks(log: str) -> list[tuple[int, int]]:
    """(rank, global step) of every ``TRAINING STARTED`` line of the requeued job."""
    found = re.findall(r"TRAINING STARTED rank=(\d+) global_step=(\d+) restart_count=1", log)
    return sorted((int(rank), int(step)) for rank, step in found)


def check_resumed_once(
    cluster: SlurmCluster, trip: RoundTrip, *, ranks: int, first_step: int, steps: int
) -> None:
    """Requeued once, by the job itself; one preemption checkpoint, saved at or after ``first_step`` and before
    the end; every rank continued at exactly the step it holds."""
    assert cluster.restart_count(trip.job) == 1
    assert first_step <= trip.saved_step < steps
    assert resumed_ranks(trip.log) == [(rank, trip.saved_step) for rank in range(ranks)], trip.log[-4000:]
    assert sorted(p.name for p in trip.checkpoint.parent.glob("hpc_ckpt_*.ckpt")) == [HPC_CHECKPOINT]


def check_dip_resumed(trip: RoundTrip, out: Path, reference_out: Path, *, ranks: int) -> None:
    """A DiP ``fit``: the kit's requeue and resume lines, Lightning's own signal handlers out of the way, and the
    final raw weights, EMA and optimizer state and the batches of every step bit for bit the reference's."""
    log = trip.log
    assert "SLURM detected: auto-requeue on SIGUSR1." in log
    assert "Preemption: requeued SLURM job" in log, log[-4000:]
    # No save inside a signal handler, no "bypassed" SIGTERM.
    assert "Handling auto-requeue signal" not in log and "Bypassing SIGTERM" not in log, log[-4000:]
    resume_line = f"Resume: from preemption checkpoint {trip.checkpoint} (step {trip.saved_step})."
    assert resume_line in log, log[-4000:]
    for rank in range(ranks):
        assert_same_final(load_final(out, rank), load_final(reference_out, rank))
        assert load_records(out, rank) == load_records(reference_out, rank)
    if ranks > 1:
        assert load_records(out, 0) != load_records(out, 1)


def report(name: str, timings: Mapping[str, float | int]) -> None:
    """One line of stage times, shown with ``pytest -s`` (the SLURM figures in BENCHMARKS.md come from it)."""
    parts = [f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in timings.items()]
    print(f"[slurm {name}] " + " ".join(parts))
