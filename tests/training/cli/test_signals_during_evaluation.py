"""Real signals to a real ``python -m dip_lightning fit`` of the tiny config while it evaluates: the evaluated step's
checkpoint is complete on disk, the process exits with 128 + the signal number, and ``fit`` again continues from
that step.

The metrics evaluation is made to last (an extractor that sleeps 0.2 s per batch of 4 samples) so that the
signals, sent when the log announces the evaluation, land inside it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import subprocess_env, tiny_args

pytestmark = pytest.mark.slow  # CLI subprocesses, each interrupted and then continued


def metrics_callback(data: dict) -> dict:
    return {
        "class_path": "dip_lightning.training.callbacks.MetricsCallback",
        "init_args": {
            "every_n_steps": 2,
            "num_samples": 64,
            "batch_size": 4,
            "num_steps": 2,
            "real_shards": data["val_shards"],
            "real_num_samples": 8,
            "metrics": ["fid"],
            "extractor": {"class_path": "tests.helpers.metrics.SlowPixelProjection"},
        },
    }


def fit_args(run: Path, data: dict, steps: int) -> list[str]:
    callbacks = [{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.9}}]
    callbacks.append(metrics_callback(data))
    args = tiny_args(run, data, "--checkpoint.every_n_train_steps=2", steps=steps, callbacks=callbacks)
    return [sys.executable, "-u", "-m", "dip_lightning", "fit", *args]


def signal_during_evaluation(
    tmp_path: Path, args: list[str], step: int, signals: list[int]
) -> tuple[int, str]:
    """Start ``fit``, wait for the announcement of the evaluation of ``step``, send ``signals`` 50 ms apart;
    returns the exit code and the output."""
    log_path = tmp_path / f"fit-{len(list(tmp_path.glob('fit-*.log')))}.log"
    announcement = f"MetricsCallback: evaluating step {step}."
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=subprocess_env(1), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 300
            while announcement not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the evaluation never started"
                time.sleep(0.05)
            for sig in signals:
                proc.send_signal(sig)
                time.sleep(0.05)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log_path.read_text(errors="replace")


def evaluated_steps(run: Path) -> list[int]:
    path = run / "tensorboard" / "eval_metrics.csv"
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    return [int(line.split(",")[0]) for line in lines]


@pytest.mark.parametrize(
    ("signals", "steps", "saved"),
    [
        # The case: the only checkpoint of the run is at its last step, which is also evaluated then.
        pytest.param([signal.SIGINT, signal.SIGINT], 2, "checkpoints/last.ckpt", id="sigint-twice-last-step"),
        pytest.param([signal.SIGTERM], 2, "checkpoints/last.ckpt", id="sigterm-last-step"),
        # The end-of-training evaluation of step 3, which no checkpoint callback saves: a preemption checkpoint.
        pytest.param([signal.SIGTERM], 3, "hpc_ckpt_1.ckpt", id="sigterm-train-end"),
    ],
)
def test_signal_during_the_evaluation_keeps_the_step_and_exits_with_its_code(
    tmp_path: Path, demo_data: dict, signals: list[int], steps: int, saved: str
) -> None:
    run = tmp_path / "run"
    code, out = signal_during_evaluation(tmp_path, fit_args(run, demo_data, steps), steps, signals)
    assert code == 128 + signals[0], out[-3000:]
    assert evaluated_steps(run) == ([2] if steps == 3 else [])  # the interrupted evaluation left no row
    checkpoint = torch.load(run / saved, map_location="cpu", weights_only=True)  # complete and loadable
    assert checkpoint["global_step"] == steps
    assert checkpoint["optimizer_states"] and checkpoint["loops"]  # a full training state, not weights only

    again = subprocess.run(
        fit_args(run, demo_data, 4), cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {run / saved}" in again.stdout + again.stderr
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 4
