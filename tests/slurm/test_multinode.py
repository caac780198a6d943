"""Multi-node SLURM: the kit's own multi-node template on a real two-node cluster, on one machine.

The cluster (:mod:`tests.helpers.slurm_two_nodes`) is two network namespaces joined by a veth link, with a
``slurmd`` in each as nodes n1 and n2. Every job here is ``experiments/slurm/train_multinode.sbatch`` itself,
submitted with ``sbatch --nodes=2 --ntasks-per-node=1``: one DDP rank per node, gloo across the link, one run
folder that both nodes see (the shared filesystem), ``python -m dip_lightning fit`` on the tiny config and the
embedded demo data.

What a CPU test changes, all outside the file (``sbatch`` options override its ``#SBATCH`` lines):

* ``--ntasks-per-node=1`` (the file: 8, one per GPU); ``--trainer.devices`` follows ``SLURM_NTASKS_PER_NODE``;
* ``--cpus-per-task=1`` (the file: 12; this machine has 2 cores); ``OMP_NUM_THREADS`` follows;
* ``--gres=none`` (no GPUs here; the file: ``--gres=gpu:8``);
* ``DIP_PYTHON`` (this interpreter), ``DIP_CONFIG`` (``experiments/tiny_cpu.yaml``) and ``PYTHONPATH`` (so that
  the probes in ``tests/helpers`` import) in the job's environment, and ``fit`` arguments after the script
  (smaller net, run folder, probes).

Everything else is the file as a user submits it: ``--nodes=2``, ``--requeue``, ``--open-mode=append``,
``--output=logs/%x-%j.out``, ``srun --kill-on-bad-exit=1``, ``MASTER_ADDR`` from the node list, the port
Lightning derives from the job id. The GPU-only lines the CPU run overrides are checked statically
(:func:`test_template_directives_agree`).

The interrupted runs are compared, bit for bit, with one uninterrupted two-node run of the same template and
arguments (:class:`ReferenceRun`, submitted once per module).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.resume import (
    STEPS,
    assert_equal_nested,
    assert_same_final,
    load_final,
    load_records,
    probe_args,
    resume_args,
)
from tests.helpers.slurm_cluster import TERMINAL_STATES, SlurmCluster, pid_alive
from tests.helpers.slurm_preemption import (
    check_dip_resumed,
    check_resumed_once,
    preempt_and_resume,
    report,
    resumed_ranks,
)
from tests.helpers.slurm_two_nodes import TwoNodeSlurmCluster
from tests.helpers.tiny import TINY_CONFIG, subprocess_env

TEMPLATES = REPO / "experiments" / "slurm"
TEMPLATE = TEMPLATES / "train_multinode.sbatch"
JOB_NAME = re.search(r"^#SBATCH --job-name=(\S+)", TEMPLATE.read_text(), re.MULTILINE).group(1)  # type: ignore[union-attr]
CPU_OPTIONS = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none")
RANKS = 2
NODE_OF_RANK = {0: "n1", 1: "n2"}
LAUNCH_REPORT = "tests.helpers.dip_probe.LaunchReport"
# Variables this test process may carry from earlier in-process runs; a user's submission would not have them.
INHERITED = ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
# From losing a node until its surviving rank is gone and the job is requeued. SLURM sets the node DOWN once
# its slurmd has not answered for SlurmdTimeout (10 s here; ~30 s measured, with the controller's ping cycle),
# then kills the job's other processes (SIGKILL KillWait = 10 s after SIGTERM). A real cluster's default
# SlurmdTimeout is 300 s.
LOST_NODE_BOUND_S = 60.0


@dataclass
class TemplateJob:
    """One submission of the template: its folder (``run/`` shared by the ranks, ``out/`` probes) and job id."""

    folder: Path
    job: int

    @property
    def run(self) -> Path:
        return self.folder / "run"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def log(self) -> Path:
        return self.folder / "logs" / f"{JOB_NAME}-{self.job}.out"  # the template's --output=logs/%x-%j.out

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "<no job log>"


def _submit(
    cluster: SlurmCluster, folder: Path, data: dict, env: dict[str, str] | None = None, **probe: object
) -> TemplateJob:
    """``sbatch`` the template with the CPU options; the fit arguments are the resume tests' tiny run."""
    (folder / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs
    out = folder / "out"
    args = resume_args(folder / "run", data) + probe_args(out, **probe)
    args += [f"--trainer.callbacks+={LAUNCH_REPORT}", f"--trainer.callbacks.init_args.out_dir={out}"]
    job_env: dict[str, str | None] = {
        "DIP_PYTHON": sys.executable,
        "DIP_CONFIG": TINY_CONFIG,
        "PYTHONPATH": subprocess_env()["PYTHONPATH"],
        **dict.fromkeys(INHERITED),
        **(env or {}),
    }
    job = cluster.sbatch(TEMPLATE, folder, *CPU_OPTIONS, env=job_env, script_args=args)
    return TemplateJob(folder, job)


def _cancel_unless_done(cluster: SlurmCluster, job: int) -> None:
    """A failed check must not leave the job holding the nodes."""
    if cluster.job_state(job) not in TERMINAL_STATES:
        cluster.scancel(job)


def _launch_reports(job: TemplateJob, restart: int) -> dict[int, dict]:
    paths = {rank: job.out / f"launch_rank{rank}_restart{restart}.json" for rank in range(RANKS)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    assert not missing, f"no launch report {missing}\n{job.log_tail()}"
    return {rank: json.loads(p.read_text()) for rank, p in paths.items()}


def _hosts(job: TemplateJob, restart: int) -> dict[int, str]:
    return {rank: launch["hostname"] for rank, launch in _launch_reports(job, restart).items()}


class ReferenceRun:
    """The uninterrupted two-node run (same template, same arguments); submitted once, when first needed.

    Its submission carries ``MASTER_ADDR=127.0.0.1``, as a submitting shell may: the template must replace it
    with the first node (:func:`test_template_environment_is_what_lightning_derives` checks that it did).
    """

    def __init__(self, cluster: SlurmCluster, folder: Path, data: dict) -> None:
        self.cluster, self.folder, self.data = cluster, folder, data
        self.job: TemplateJob | None = None
        self._completed = False

    def start(self) -> None:
        if self.job is None:
            self.job = _submit(self.cluster, self.folder, self.data, env={"MASTER_ADDR": "127.0.0.1"})

    def result(self, timeout: float = 240.0) -> TemplateJob:
        """The completed run (submitting it first if nobody did)."""
        self.start()
        assert self.job is not None
        if not self._completed:
            try:
                self.cluster.wait_for_state(self.job.job, "COMPLETED", timeout=timeout)
            except Exception as err:
                raise AssertionError(f"reference run failed: {err}\n{self.job.log_tail()}") from err
            self._completed = True
        return self.job

    def wait(self) -> None:
        self.result()

    def cancel_if_running(self) -> None:
        if self.job is not None:
            _cancel_unless_done(self.cluster, self.job.job)


@pytest.fixture(scope="module")
def reference(
    two_node_cluster: TwoNodeSlurmCluster, demo_data: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReferenceRun]:
    ref = ReferenceRun(two_node_cluster, tmp_path_factory.mktemp("multinode_reference"), demo_data)
    try:
        yield ref
    finally:
        ref.cancel_if_running()


def _assert_same_as_reference(got: TemplateJob, want: TemplateJob) -> None:
    """Final raw weights, EMA and optimizer state bit for bit on every rank; ranks saw different data."""
    for rank in range(RANKS):
        assert_same_final(load_final(got.out, rank), load_final(want.out, rank))
    assert load_records(want.out, 0) != load_records(want.out, 1)


# ---------------------------------------------------------------------------------------------------- 1
@pytest.mark.slurm
def test_usr1_preempts_requeues_and_resumes_on_both_nodes_bit_exact(
    two_node_cluster: TwoNodeSlurmCluster, reference: ReferenceRun, tmp_path: Path, demo_data: dict
) -> None:
    """USR1 mid-run: one save, one requeue, both nodes resume at the saved step, final state = uninterrupted."""
    cluster = two_node_cluster
    t0 = time.monotonic()
    # step_sleep stretches the run so USR1 lands mid-training; hold_at_step is a backstop for a starved machine.
    job = _submit(cluster, tmp_path, demo_data, progress_every=5, step_sleep=0.15, hold_at_step=20)
    # The srun tasks on both nodes get USR1, like --signal=USR1@90.
    trip = preempt_and_resume(
        cluster, job.job, job.log, job.run, reference, ranks=RANKS, signal_after_step=5, submitted_at=t0
    )
    log = trip.log

    # SLURM: both runs on both nodes; the last srun succeeded.
    for restart in (0, 1):
        assert f"job={job.job} restart={restart} nodes=n[1-2] master=n1 " in log, log[-4000:]
        assert _hosts(job, restart) == NODE_OF_RANK
    assert log.rstrip().splitlines()[-1].startswith("srun exit code 0 "), log[-4000:]
    # Requeued once, one preemption checkpoint chosen automatically; every rank continued at its step.
    check_resumed_once(cluster, trip, ranks=RANKS, first_step=5, steps=STEPS)
    # Bit for bit the uninterrupted two-node run, and the same batches at every step on every rank.
    check_dip_resumed(trip, job.out, reference.result().out, ranks=RANKS)

    report("2 nodes usr1", {**trip.timings, "saved_step": trip.saved_step})


# ---------------------------------------------------------------------------------------------------- 2
def _rank_pids(cluster: TwoNodeSlurmCluster, node: str) -> list[int]:
    """The training ranks (``DIP_PYTHON -m dip_lightning``) running on ``node``."""
    wanted = [sys.executable.encode(), b"-m", b"dip_lightning"]
    pids = []
    for pid in cluster.node_pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:3] == wanted:
            pids.append(pid)
    return pids


def _wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of ``pids`` runs; fails after ``timeout``."""
    start = time.monotonic()
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() - start < timeout, (
            f"ranks {pids} still run {timeout:.0f} s after losing a node"
        )
        time.sleep(0.1)
    return time.monotonic() - start


def _newest_complete_checkpoint(run: Path) -> int:
    """The newest periodic checkpoint and ``last.ckpt`` load and hold the same state; returns its step."""
    folder = run / "checkpoints"
    periodic = {
        int(m.group(1)): p for p in folder.iterdir() if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name))
    }
    assert periodic, f"no periodic checkpoint in {folder}"
    newest = max(periodic)
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    same = torch.load(periodic[newest], map_location="cpu", weights_only=True)
    assert last["global_step"] == same["global_step"] == newest
    assert_equal_nested(last["state_dict"], same["state_dict"], "state_dict")
    assert_equal_nested(last["optimizer_states"], same["optimizer_states"], "optimizer_states")
    # A world with a dead rank cannot agree on a preemption save: none may have been written.
    assert not list(run.glob("hpc_ckpt_*.ckpt"))
    return newest


def _assert_replays_identical(got: list[dict], want: list[dict]) -> int:
    """Steps trained twice (after the checkpoint, before the loss) saw the same batches both times, and the
    run's steps are the reference's; returns how many steps were replayed."""
    by_step: dict[int, list[dict]] = {}
    for record in got:
        by_step.setdefault(record["step"], []).append(record)
    for step, records in by_step.items():
        assert all(r == records[0] for r in records), f"step {step} saw different batches when replayed"
    assert [records[0] for _, records in sorted(by_step.items())] == want
    return sum(len(records) > 1 for records in by_step.values())


@pytest.mark.slurm
@pytest.mark.parametrize("loss", ["processes_killed", "power_cut"])
def test_lost_node_requeues_and_resumes_from_newest_complete_checkpoint(
    two_node_cluster: TwoNodeSlurmCluster, reference: ReferenceRun, tmp_path: Path, demo_data: dict, loss: str
) -> None:
    """n2 lost mid-run: n1's rank is gone within a bound, the job requeues, the newest complete checkpoint is
    intact and the next run (n2 back) resumes from it on both nodes and ends equal to the uninterrupted run.

    ``processes_killed``: n2's slurmd, slurmstepd and rank are SIGKILLed; the kernel resets their connections,
    so rank 0's next gloo call fails at once. ``power_cut``: the link goes down first, so nothing reaches n1;
    rank 0 blocks in gloo (whose own timeout is 30 min) until SLURM, having set n2 DOWN, kills it.
    """
    cluster = two_node_cluster
    # Checkpoints every 5 steps; the loss comes after step 12 (hold_at_step: backstop for a starved machine).
    job = _submit(cluster, tmp_path, demo_data, progress_every=1, step_sleep=0.15, hold_at_step=25)
    try:
        cluster.wait_for_file_text(job.log, "TRAINING STARTED", timeout=180, count=RANKS)
        cluster.wait_for_file_text(job.log, "PROGRESS global_step=12", timeout=120)
        survivors = _rank_pids(cluster, "n1")
        assert len(survivors) == 1, f"expected rank 0 on n1, found pids {survivors}"
        t_lost = time.monotonic()
        if loss == "power_cut":
            cluster.set_link("n2", up=False)
        killed = cluster.kill_node("n2")  # its slurmd, slurmstepd and rank 1, all at once
        assert killed

        # The surviving rank does not hang, and SLURM requeues the job (--requeue) once the node is DOWN: the
        # restart count goes up at once, PENDING follows when the job's processes on n1 are gone.
        survivor_gone_s = _wait_gone(survivors, LOST_NODE_BOUND_S)
        remaining = max(1.0, LOST_NODE_BOUND_S - (time.monotonic() - t_lost))
        cluster.wait_for_state(job.job, "PENDING", timeout=remaining)
        requeued_s = time.monotonic() - t_lost
        assert cluster.restart_count(job.job) == 1
        assert cluster.node_states()["n2"].startswith("down"), cluster.node_states()
        newest_step = _newest_complete_checkpoint(job.run)
        assert 10 <= newest_step < STEPS

        cluster.restore_node("n2")  # the node comes back; the requeued job needs both
        cluster.release_pending_now(job.job, timeout=60)
        cluster.wait_for_state(job.job, "RUNNING", timeout=60)
        cluster.wait_for_state(job.job, "COMPLETED", timeout=300)
        want = reference.result()
    finally:
        _cancel_unless_done(cluster, job.job)
        cluster.restore_node("n2")  # after a failed check too: the other tests need both nodes
    log = job.log.read_text()

    assert "DUE TO NODE FAILURE" in log, log[-4000:]
    assert cluster.restart_count(job.job) == 1
    assert f"job={job.job} restart=1 nodes=n[1-2] master=n1 " in log, log[-4000:]
    assert _hosts(job, 1) == NODE_OF_RANK
    last = job.run / "checkpoints" / "last.ckpt"
    assert f"Resume: from last checkpoint {last} (step {newest_step})." in log, log[-4000:]
    assert resumed_ranks(log) == [(rank, newest_step) for rank in range(RANKS)], log[-4000:]
    assert log.rstrip().splitlines()[-1].startswith("srun exit code 0 "), log[-4000:]

    _assert_same_as_reference(job, want)
    replayed = [
        _assert_replays_identical(load_records(job.out, r), load_records(want.out, r)) for r in range(RANKS)
    ]
    assert min(replayed) >= 12 - newest_step  # at least the steps between the checkpoint and the loss

    report(
        f"2 nodes lost node ({loss})",
        {"survivor_gone_s": survivor_gone_s, "requeued_s": requeued_s, "resumed_from_step": newest_step},
    )


# ---------------------------------------------------------------------------------------------------- 3
@pytest.mark.slurm
def test_template_environment_is_what_lightning_derives(
    two_node_cluster: TwoNodeSlurmCluster, reference: ReferenceRun
) -> None:
    """Each rank's launch environment (set by SLURM and the template) against what Lightning made of it."""
    reports = _launch_reports(reference.result(), restart=0)
    nodes = list(two_node_cluster.node_names)
    for rank, got in reports.items():
        env = got["env"]
        assert env["SLURM_JOB_NODELIST"] == env["SLURM_NODELIST"] == "n[1-2]"
        assert got["cluster_environment"] == "SLURMEnvironment" and got["strategy"] == "DDPStrategy"
        # Who is who: one rank per node in node order, as Lightning's DDP assumes (global = node * devices + local).
        assert got["hostname"] == NODE_OF_RANK[rank]
        assert got["global_rank"] == int(env["SLURM_PROCID"]) == rank
        assert got["node_rank"] == int(env["SLURM_NODEID"]) == nodes.index(got["hostname"])
        assert got["local_rank"] == int(env["SLURM_LOCALID"]) == 0
        assert got["global_rank"] == got["node_rank"] * got["num_devices"] + got["local_rank"]
        # World size: what SLURM allocated is what the template told the Trainer (devices, num_nodes).
        assert got["num_nodes"] == int(env["SLURM_NNODES"]) == 2
        assert got["num_devices"] == int(env["SLURM_NTASKS_PER_NODE"]) == 1
        assert got["world_size"] == int(env["SLURM_NTASKS"]) == got["num_nodes"] * got["num_devices"] == RANKS
        assert got["dist"] == {"rank": rank, "world_size": RANKS, "backend": "gloo"}
        # Rendezvous: the template's MASTER_ADDR is the first node of the list (what Lightning derives without
        # it), not the 127.0.0.1 the submission carried, and it resolves to n1's address on both nodes.
        assert env["MASTER_ADDR"] == got["main_address"] == got["nodelist_root"] == nodes[0]
        assert got["main_address_resolved"] == two_node_cluster.addresses[nodes[0]]
        # Gloo binds to the address the node's hostname resolves to: the node's own address.
        assert got["hostname_address"] == two_node_cluster.addresses[got["hostname"]]
        # Port: Lightning's default from the job id (15000 + its last 4 digits), the same on every rank.
        assert got["main_port"] == int(env["MASTER_PORT"]) == 15000 + int(env["SLURM_JOB_ID"][-4:])
        # Threads: one per CPU of the task (the template sets OMP_NUM_THREADS from SLURM_CPUS_PER_TASK).
        assert env["OMP_NUM_THREADS"] == env["SLURM_CPUS_PER_TASK"] == "1" and got["torch_threads"] == 1


def _directives(text: str) -> dict[str, str]:
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.MULTILINE)
    return {name: value for name, value in found}


@pytest.mark.parametrize("name", ["train_multinode.sbatch", "train_1node_8gpu.sbatch"])
def test_template_directives_agree(name: str) -> None:
    """The GPU-only lines that the CPU runs override, checked as written: an edit that breaks them fails here."""
    text = (TEMPLATES / name).read_text()
    sbatch = _directives(text)
    command = text[text.index("\nsrun ") :].replace("\\\n", " ")
    tasks = int(sbatch["ntasks-per-node"])
    assert sbatch["gres"] == f"gpu:{tasks}", (
        "one task per GPU: --ntasks-per-node must equal the GPUs in --gres"
    )
    devices = re.search(r"--trainer\.devices=(\S+)", command).group(1)  # type: ignore[union-attr]
    assert devices in ('"${SLURM_NTASKS_PER_NODE}"', str(tasks)), f"--trainer.devices={devices}"
    assert '--trainer.num_nodes="${SLURM_NNODES}"' in command
    assert "--kill-on-bad-exit=1" in command
    assert "requeue" in sbatch and sbatch["open-mode"] == "append"
    # The time-limit signal goes to the ranks (no "B:") and is the one the kit requeues on.
    signal_name = re.fullmatch(r"(\w+)@\d+", sbatch["signal"]).group(1)  # type: ignore[union-attr]
    requeue = re.search(r"--requeue_signal[ =](\S+)", command)
    assert ("SIG" + signal_name) == (requeue.group(1) if requeue else "SIGUSR1")
