"""Real checkpoints for the autoguidance tests: a tiny run whose step-2 checkpoint guides its last one, and a
run of another patch size (a guide that does not fit)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tiny import HIGH_LR, ema_callback, fit_with, tiny_args


def guided_runs(root: Path, data: dict) -> dict[str, Path]:
    """``main``: the last checkpoint of a 4-step run; ``guide``: its checkpoint at step 2; ``other``: a run on
    16 px patches instead of 8."""
    main = root / "main"
    fit_with(
        tiny_args(
            main, data, HIGH_LR, "--checkpoint.every_n_train_steps=2", steps=4, callbacks=[ema_callback()]
        )
    )
    other = root / "other"
    fit_with(tiny_args(other, data, "--model.net.init_args.patch_size=16", steps=1))
    return {
        "main": main / "checkpoints" / "last.ckpt",
        "guide": main / "checkpoints" / "step00000002.ckpt",
        "other": other / "checkpoints" / "last.ckpt",
    }
