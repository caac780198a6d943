"""Exact resume through the real CLI: interrupt, ``fit`` again, and end with the uninterrupted run's bits.

Every test compares against one uninterrupted 30-step run (``reference``) of the same tiny config (64-wide
DiP, EMA decay 0.9, checkpoints every 5 steps, 12 batches per epoch so resumes land mid-epoch and cross
epochs). Runs are in-process where possible (fast), in subprocesses where a real kill is needed. What is
compared: raw weights, EMA weights (and its update count), optimizer state, and what every step saw (step,
epoch, batch index, labels), with ``torch.equal`` / exact equality.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dip_lightning.callbacks.preemption import PerJobTimer, PreemptionGuard, TrainingInterrupted
from dip_lightning.checkpointing import (
    PARTIAL_DIR,
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointMismatchError,
    clean_partial_files,
    next_preemption_path,
    prune_preemption_checkpoints,
    resolve_resume,
)
from dip_lightning.cli import DiPCLI

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "experiments" / "tiny_cpu.yaml")
ASSETS = Path(__file__).parent / "slurm_assets"
STEPS = 30
PROBE = "dip_probe.ResumeProbe"

if str(ASSETS) not in sys.path:
    sys.path.insert(0, str(ASSETS))


def resume_args(run_dir: Path, data: dict, *extra: str, steps: int = STEPS, hidden: int = 64) -> list[str]:
    """The tiny config, small enough for seconds per run; EMA is the only config callback."""
    return [
        "--config",
        TINY_CONFIG,
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=5",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        '--trainer.callbacks=[{"class_path": "dip_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]',
        f"--data.init_args.train_shards={data['train_shards']}",
        f"--data.init_args.val_shards={data['val_shards']}",
        "--data.init_args.batch_size=8",
        "--data.init_args.epoch_length=96",  # 12 batches per epoch: resumes land mid-epoch
        f"--model.net.init_args.hidden_size={hidden}",
        "--model.net.init_args.depth=2",
        "--model.net.init_args.num_heads=2",
        "--model.net.init_args.head.init_args.base_channels=8",
        "--checkpoint.every_n_train_steps=5",
        *extra,
    ]


def probe_args(out_dir: Path, **init_args: Any) -> list[str]:
    args = [f"--trainer.callbacks+={PROBE}", f"--trainer.callbacks.init_args.out_dir={out_dir}"]
    return args + [f"--trainer.callbacks.init_args.{k}={v}" for k, v in init_args.items()]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_fit(args: list[str]) -> tuple[TrainingInterrupted | None, list[str]]:
    """``fit`` through the CLI in-process; returns the interruption (if any) and Lightning's log lines."""
    handler = _Lines()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        DiPCLI(args=["fit", *args])
    except TrainingInterrupted as stop:
        return stop, handler.lines
    finally:
        logger.removeHandler(handler)
    return None, handler.lines


def load_final(out_dir: Path, rank: int = 0) -> dict:
    return torch.load(out_dir / f"final_rank{rank}.pt", map_location="cpu", weights_only=False)


def load_records(out_dir: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out_dir / f"steps_rank{rank}.jsonl").read_text().splitlines()]


def _equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_final(got: dict, want: dict) -> None:
    """Raw weights, EMA weights (with n_averaged) and optimizer state identical, bit for bit."""
    assert got["global_step"] == want["global_step"] == STEPS
    assert want["ema"] is not None and int(want["ema"]["n_averaged"]) == STEPS
    _equal(got["raw"], want["raw"], "raw")
    _equal(got["ema"], want["ema"], "ema")
    _equal(got["optimizer"], want["optimizer"], "optimizer")
    # Not vacuous: EMA and raw weights differ, so both were compared.
    assert any(not torch.equal(got["raw"][k], got["ema"][f"module.{k}"]) for k in got["raw"])


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    """The same batches (labels), at the same step, epoch and batch index: the data position was restored."""
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == want


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


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # Same thread count as this process, so CPU kernels reduce in the same order as the in-process reference.
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = os.pathsep.join([str(ASSETS), str(REPO), env.get("PYTHONPATH", "")])
    return env


# ------------------------------------------------------------------------------------------ exact resume
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
    # Periodic checkpoints are older (step 15): the preemption checkpoint must win.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 15
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
    """SIGKILL in the middle of writing last.ckpt: the old last.ckpt stays whole, and fit resumes from it."""
    run, out, marker = tmp_path / "run", tmp_path / "out", tmp_path / "stalled"
    # Saves: 1 step00000005.ckpt, 2 last.ckpt (step 5), 3 step00000010.ckpt, 4 last.ckpt (step 10) <- stalls.
    plugin = json.dumps(
        [
            {
                "class_path": "dip_probe.SlowSaveCheckpointIO",
                "init_args": {"marker": str(marker), "stall_save": 4},
            }
        ]
    )
    args = resume_args(run, demo_data, f"--trainer.plugins={plugin}", *probe_args(out))
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dip_lightning", "fit", *args],
        cwd=tmp_path,
        env=_subprocess_env(),
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
    assert partial.parent == run / "checkpoints" / PARTIAL_DIR and partial.name.startswith("last.ckpt.")
    assert partial.exists()  # the half-written temporary file
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5  # the previous, complete last.ckpt
    assert (run / "checkpoints" / "step00000010.ckpt").exists()

    stop, lines = run_fit(resume_args(run, demo_data, *probe_args(out)))
    assert stop is None
    assert any("unfinished checkpoint file" in line for line in lines)
    assert not partial.exists()
    assert f"Resume: from last checkpoint {run / 'checkpoints' / 'last.ckpt'} (step 5)." in lines
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


# ------------------------------------------------------------------------------------------ wrong checkpoints
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_resume_with_mismatched_config_fails_before_writing(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    stop, _ = run_fit(resume_args(run, demo_data, steps=5))
    assert stop is None
    before = _snapshot(run)
    with pytest.raises(CheckpointMismatchError) as err:
        run_fit(resume_args(run, demo_data, steps=10, hidden=96))
    message = str(err.value)
    assert str(run / "checkpoints" / "last.ckpt") in message
    assert "net.init_args.hidden_size: checkpoint 64, this run 96" in message
    assert "differ in shape" in message and "[64," in message and "[96," in message
    assert _snapshot(run) == before  # no config.yaml rewrite, no log folder, no checkpoint touched

    # A foreign preemption checkpoint (another model) in the run folder is an error too, not a silent skip.
    other = tmp_path / "other"
    run_fit(resume_args(other, demo_data, steps=5, hidden=96))
    (run / "hpc_ckpt_1.ckpt").write_bytes((other / "checkpoints" / "last.ckpt").read_bytes())
    before = _snapshot(run)
    with pytest.raises(CheckpointMismatchError, match="hpc_ckpt_1.ckpt"):
        run_fit(resume_args(run, demo_data, steps=10))
    assert _snapshot(run) == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, demo_data: dict) -> None:
    run = tmp_path / "run"
    run_fit(resume_args(run, demo_data, steps=5))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by something else than the kit
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: the file is truncated or corrupt"):
        run_fit(resume_args(run, demo_data, steps=10))
    assert _snapshot(run) == before
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(last)


# ------------------------------------------------------------------------------------------ time limits
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


# ------------------------------------------------------------------------------------------ pieces
def _fake_ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {}}, path)
    return path


def test_resume_resolution_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert resolve_resume(run).path is None and resolve_resume(run).source == "fresh"
    last = _fake_ckpt(run / "checkpoints" / "last.ckpt", 10)
    assert resolve_resume(run).path == last
    hpc1 = _fake_ckpt(run / "hpc_ckpt_1.ckpt", 12)
    hpc2 = _fake_ckpt(run / "hpc_ckpt_2.ckpt", 10)  # same step as last.ckpt: the preemption save wins
    decision = resolve_resume(run)
    assert decision.path == hpc2 and decision.source == "preemption"
    assert [p for p, _ in decision.ignored] == [hpc1]
    explicit = _fake_ckpt(tmp_path / "elsewhere.ckpt", 3)
    assert resolve_resume(run, explicit=explicit).path == explicit
    _fake_ckpt(run / "checkpoints" / "last.ckpt", 20)
    assert resolve_resume(run).path == last  # both preemption checkpoints are behind: stale
    assert next_preemption_path(run) == run / "hpc_ckpt_3.ckpt"
    assert prune_preemption_checkpoints(run, keep=hpc2) == [hpc1]
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt"]


def test_atomic_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "hpc_ckpt_1.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, target)
    io.save_checkpoint({"global_step": 2, "w": torch.arange(5.0)}, target)  # overwrite in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["hpc_ckpt_1.ckpt"]
    loaded = io.load_checkpoint(target)
    assert loaded["global_step"] == 2 and torch.equal(loaded["w"], torch.arange(5.0))
    # Leftovers of killed saves are cleaned up before the next fit starts.
    (target.parent / PARTIAL_DIR).mkdir()
    (target.parent / PARTIAL_DIR / "hpc_ckpt_2.ckpt.4711").write_bytes(b"half")
    assert len(clean_partial_files([target.parent])) == 1
    assert not (target.parent / PARTIAL_DIR).exists()


def test_cli_adds_slurm_requeue_only_under_slurm(
    tmp_path: Path, demo_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    cli = DiPCLI(args=resume_args(tmp_path / "laptop", demo_data), run=False)
    env = cli.trainer._accelerator_connector.cluster_environment
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
    env = cli.trainer._accelerator_connector.cluster_environment
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


def test_training_noise_ignores_the_global_rng(tmp_path: Path, demo_data: dict) -> None:
    """The flow's noise, time and dropout draws are keyed by (seed, rank, step), not the global RNG."""
    cli = DiPCLI(args=resume_args(tmp_path / "run", demo_data), run=False)
    module = cli.model
    x, y = torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    first = module._losses(x, y, generator=module._training_generator(x.device))["loss"]
    module._noise_step = None  # a fresh process at the same step
    torch.manual_seed(123)
    torch.rand(1000)
    again = module._losses(x, y, generator=module._training_generator(x.device))["loss"]
    assert torch.equal(first, again)
    second_micro = module._losses(x, y, generator=module._training_generator(x.device))["loss"]
    assert not torch.equal(first, second_micro)  # the next micro-batch of the same step draws anew


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_two_processes_sigterm_on_one_rank_resumes_bit_exact(tmp_path: Path, demo_data: dict) -> None:
    """Two gloo processes (Lightning's launcher, no SLURM): SIGTERM reaches rank 0 only; both ranks agree
    on the step, save once and stop; `fit` again gives the uninterrupted two-process run's bits on both ranks.
    """
    env = _subprocess_env()

    def fit_ddp(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        args = resume_args(run, demo_data, "--trainer.devices=2", "--trainer.strategy=ddp", *probe_args(out))
        return subprocess.run(
            [sys.executable, "-m", "dip_lightning", "fit", *args, *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

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
    second = fit_ddp(run, out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resume: from preemption checkpoint" in second.stderr + second.stdout
    for rank in (0, 1):
        got, want = load_final(out, rank), load_final(tmp_path / "ref_out", rank)
        assert_same_final(got, want)
        assert load_records(out, rank) == load_records(tmp_path / "ref_out", rank)
    assert load_records(out, 0) != load_records(out, 1)  # the ranks saw different data


def test_guard_skips_lightnings_per_step_sigterm_broadcast_while_it_owns_sigterm() -> None:
    # Lightning broadcasts its SIGTERM flag before every DDP step (a collective + `.item()`); with the guard's
    # handler in place that flag cannot be set, so the guard swaps the broadcast out for the fit and back after.
    import lightning.pytorch as pl

    from dip_lightning.callbacks.preemption import _skip_sigterm_broadcast

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            seen.append(trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):  # noqa: ANN001
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[PreemptionGuard(), Probe()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), train_dataloaders=data)
    assert seen == [_skip_sigterm_broadcast] * 3
    assert "_broadcast_sigterm_tensor" not in trainer.fit_loop.epoch_loop.__dict__
