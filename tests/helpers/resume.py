"""Exact-resume machinery: the resume tests' run arguments, the in-process ``fit``, the bit-for-bit comparisons.

Every exact-resume test compares against one uninterrupted ``STEPS``-step run of the same tiny config (64-wide
DiP, EMA decays 0.9 and 0.6, checkpoints every 5 steps, 12 batches per epoch so resumes land mid-epoch and cross
epochs). The probe callback (:mod:`tests.helpers.dip_probe`) records what every step saw and the final state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from dip_lightning.training.callbacks.preemption import TrainingInterrupted
from dip_lightning.training.cli import DiPCLI
from tests.helpers.tiny import tiny_args

STEPS = 30
PROBE = "tests.helpers.dip_probe.ResumeProbe"
# Two decays: resume must restore the first (Lightning's averaged model) and the further one (checkpoint["ema"]).
EMA_ONLY = [{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": [0.9, 0.6]}}]


def resume_args(run_dir: Path, data: dict, *extra: str, steps: int = STEPS, hidden: int = 64) -> list[str]:
    """The tiny config, small enough for seconds per run; EMA is the only config callback."""
    return tiny_args(
        run_dir,
        data,
        "--data.init_args.epoch_length=96",  # 12 batches per epoch: resumes land mid-epoch
        f"--model.net.init_args.hidden_size={hidden}",
        "--checkpoint.every_n_train_steps=5",
        *extra,
        steps=steps,
        callbacks=EMA_ONLY,
        log_every_n_steps=5,
    )


def probe_args(out_dir: Path, **init_args: Any) -> list[str]:
    args = [f"--trainer.callbacks+={PROBE}", f"--trainer.callbacks.init_args.out_dir={out_dir}"]
    return args + [f"--trainer.callbacks.init_args.{k}={v}" for k, v in init_args.items()]


class LogLines(logging.Handler):
    """Collects the messages of a logger (Lightning's rank-zero info lines, such as the resume line)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_fit(args: list[str]) -> tuple[TrainingInterrupted | None, list[str]]:
    """``fit`` through the CLI in-process; returns the interruption (if any) and Lightning's log lines."""
    handler = LogLines()
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


def assert_equal_nested(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested dicts / lists / tensors, naming the first place that differs."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_final(got: dict, want: dict, steps: int = STEPS) -> None:
    """Raw weights, every EMA decay's weights (the first with n_averaged) and optimizer state identical, bit for
    bit."""
    assert got["global_step"] == want["global_step"] == steps
    assert want["ema"] is not None and int(want["ema"]["n_averaged"]) == steps
    assert_equal_nested(got["raw"], want["raw"], "raw")
    assert_equal_nested(got["ema"], want["ema"], "ema")
    assert list(want["further_emas"]) == [0.6]
    assert_equal_nested(got["further_emas"], want["further_emas"], "further_emas")
    assert_equal_nested(got["optimizer"], want["optimizer"], "optimizer")
    # Not vacuous: the EMAs differ from the raw weights and from each other, so each was compared.
    first = {k: got["ema"][f"module.{k}"] for k in got["raw"]}
    for name, weights in {"raw": got["raw"], "ema 0.6": got["further_emas"][0.6]}.items():
        assert any(not torch.equal(weights[k], first[k]) for k in first), f"{name} equals the first EMA"
    assert any(not torch.equal(got["raw"][k], got["further_emas"][0.6][k]) for k in first)


def assert_same_steps(got: list[dict], want: list[dict], steps: int = STEPS) -> None:
    """The same batches (labels), at the same step, epoch and batch index: the data position was restored."""
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert got == want


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file below ``folder``: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}
