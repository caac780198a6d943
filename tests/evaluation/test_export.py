"""Sample export (``python -m dip_lightning sample``), ``predict`` and the ``evaluate``/``fid`` commands, from a
checkpoint trained through the CLI.

The checkpoint: the tiny config with a 64-wide DiP, 8 steps with EMA (decay 0.5), a 4-step Euler sampler with
``time_shift=2`` (so that a sampler switch has a field to lose). Exports are a few images of 32 px; the
interrupted exports are compared with uninterrupted ones byte for byte (the npz files, not only the arrays).
A subprocess costs seconds of imports (torch + Lightning): only the SIGKILL and multi-process tests start one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.__main__ import main as dip_main
from dip_lightning.core.diffusion import HeunSampler, make_noise
from dip_lightning.core.images import to_uint8
from dip_lightning.evaluation.export import export_samples
from dip_lightning.training.cli import DiPCLI
from dip_lightning.training.loading import load_module
from tests.helpers.tiny import (
    HIGH_LR,
    REPO,
    TINY_CONFIG,
    fit_tiny,
    small_net_config,
    subprocess_env,
    tiny_args,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> Path:
    """last.ckpt of an 8-step CLI run with EMA; the last step is a checkpoint step."""
    run_dir = tmp_path_factory.mktemp("export_run") / "run"
    ema = [{"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decay": 0.5}}]
    args = tiny_args(
        run_dir,
        demo_data,
        "--checkpoint.every_n_train_steps=8",
        HIGH_LR,
        "--model.sampler.init_args.num_steps=4",
        "--model.sampler.init_args.time_shift=2.0",
        steps=8,
        callbacks=ema,
    )
    cli = DiPCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return run_dir / "checkpoints" / "last.ckpt"


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def chunk_files(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".parts").glob("chunk_*.npz"))


def sample_cmd(ckpt: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "dip_lightning", "sample", "--ckpt_path", str(ckpt), *flags]


# ------------------------------------------------------------------------------------------------ library
def test_export_killed_after_some_chunks_resumes_to_the_same_file(ckpt: Path, tmp_path: Path) -> None:
    module = load_module(ckpt)
    settings = {"num_samples": 10, "batch_size": 2, "chunk_size": 3, "seed": 11}
    whole = export_samples(module, tmp_path / "whole.npz", **settings)
    assert whole == tmp_path / "whole.npz"

    out = tmp_path / "resumed.npz"
    assert export_samples(module, out, **settings, max_chunks=1) is None  # "killed" after one chunk
    assert not out.exists() and len(chunk_files(out)) == 1
    first_chunk = chunk_files(out)[0].read_bytes()
    assert export_samples(module, out, **settings, max_chunks=2) is None
    assert not out.exists() and len(chunk_files(out)) == 3
    assert export_samples(module, out, **settings) == out
    assert chunk_files(out)[0].read_bytes() == first_chunk  # finished chunks are kept, not redone
    assert out.read_bytes() == whole.read_bytes()

    data = load_npz(out)
    assert sorted(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (10, 32, 32, 3)
    assert np.array_equal(data["arr_1"], np.arange(10) % 8)
    # Same seed, same images; another seed, other images.
    other = export_samples(module, tmp_path / "other.npz", **{**settings, "seed": 12})
    assert other is not None and not np.array_equal(load_npz(other)["arr_0"], data["arr_0"])


def test_export_refuses_chunks_of_other_settings(ckpt: Path, tmp_path: Path) -> None:
    module = load_module(ckpt)
    out = tmp_path / "samples.npz"
    settings = {"num_samples": 6, "batch_size": 3, "chunk_size": 3}
    assert export_samples(module, out, **settings, max_chunks=1) is None
    before = [p.read_bytes() for p in chunk_files(out)]
    with pytest.raises(RuntimeError, match="another export.*seed"):
        export_samples(module, out, **settings, seed=1)
    with pytest.raises(RuntimeError, match="another export.*sampler"):
        export_samples(module, out, **settings, cfg_scale=2.0)
    with pytest.raises(RuntimeError, match="another export.*weights_sha256"):
        export_samples(load_module(ckpt, weights="raw"), out, **settings)
    assert [p.read_bytes() for p in chunk_files(out)] == before
    assert export_samples(module, out, **settings) == out
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_samples(module, out, **settings)


# ---------------------------------------------------------------------------------------------- command line
def test_sample_command_on_chunks_of_another_export_is_a_clear_error(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The command says which folder holds another export's chunks and exits 2 (it used to raise a traceback)."""
    out = tmp_path / "samples.npz"
    flags = ["--num_samples", "4", "--batch_size", "2", "--chunk_size", "2", "--out", str(out)]
    assert (
        export_samples(load_module(ckpt), out, num_samples=4, batch_size=2, chunk_size=2, max_chunks=1)
        is None
    )
    before = [p.read_bytes() for p in chunk_files(out)]
    capsys.readouterr()
    assert dip_main(["sample", "--ckpt_path", str(ckpt), *flags, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another export (different seed)" in err and "--out" in err
    assert [p.read_bytes() for p in chunk_files(out)] == before


@pytest.mark.slow
def test_sample_command_killed_with_sigkill_resumes_byte_identical(ckpt: Path, tmp_path: Path) -> None:
    flags = [
        "--num_samples",
        "8",
        "--chunk_size",
        "1",
        "--batch_size",
        "1",
        "--num_steps",
        "40",
        "--seed",
        "3",
    ]
    reference = export_samples(
        load_module(ckpt), tmp_path / "reference.npz", 8, batch_size=1, chunk_size=1, seed=3, num_steps=40
    )
    assert reference is not None

    out = tmp_path / "killed.npz"
    proc = subprocess.Popen(
        sample_cmd(ckpt, "--out", str(out), *flags),
        cwd=REPO,
        env=subprocess_env(threads=1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while len(chunk_files(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"export ended before the kill: {proc.stderr.read().decode()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: p.read_bytes() for p in chunk_files(out)}
    assert not out.exists() and 2 <= len(done) < 8

    # Run again (in-process: the same command, without paying the imports a second time).
    assert dip_main(["sample", "--ckpt_path", str(ckpt), "--out", str(out), *flags]) == 0
    assert {p.name: p.read_bytes() for p in chunk_files(out) if p.name in done} == done
    assert len(chunk_files(out)) == 8
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.slow
def test_sample_command_spreads_chunks_over_processes(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 is a process with srun's variables, rank 0 this one with torchrun's; rank 0 waits for rank 1's
    chunks; the result is the file a single process writes."""
    reference = export_samples(load_module(ckpt), tmp_path / "reference.npz", 8, batch_size=2, chunk_size=2)
    assert reference is not None
    out = tmp_path / "two.npz"
    flags = ["--out", str(out), "--num_samples", "8", "--chunk_size", "2", "--batch_size", "2"]
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    rank1 = subprocess.Popen(
        sample_cmd(ckpt, *flags),
        cwd=REPO,
        env={**subprocess_env(threads=1), **srun},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for key in [k for k in os.environ if k.startswith("SLURM_")]:
            monkeypatch.delenv(key)
        for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        assert dip_main(["sample", "--ckpt_path", str(ckpt), *flags]) == 0
    finally:
        stdout, stderr = rank1.communicate(timeout=300)
    assert rank1.returncode == 0, stderr[-3000:]
    # Rank 1 made chunks 1 and 3; it assembles too when it is the last to finish (the same bytes, atomically).
    assert "rank 1: my chunks are done" in stdout or "on rank 1" in stdout
    assert out.read_bytes() == reference.read_bytes()
    assert len(chunk_files(out)) == 4


def test_sample_command_flags(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = [
        "sample",
        "--ckpt_path",
        str(ckpt),
        "--num_samples",
        "8",
        "--chunk_size",
        "4",
        "--batch_size",
        "4",
    ]

    def sample(name: str, *flags: str) -> tuple[dict[str, np.ndarray], dict]:
        out = tmp_path / f"{name}.npz"
        assert dip_main([*base, "--out", str(out), *flags]) == 0
        job = json.loads((out.with_name(out.name + ".parts") / "job.json").read_text())
        return load_npz(out), job

    ema, ema_job = sample("ema")
    raw, raw_job = sample("raw", "--weights", "raw")
    heun, heun_job = sample("heun", "--sampler", "heun")
    # An 8-step model barely depends on its label: a large scale makes guidance visible in uint8.
    cfg, cfg_job = sample("cfg", "--cfg_scale", "30", "--cfg_interval", "0.2", "0.9")
    cfg_all, _ = sample("cfg_all", "--cfg_scale", "30", "--cfg_interval", "-1", "2")
    unbalanced, _ = sample("unbalanced", "--no-balanced")
    assert "wrote" in capsys.readouterr().out

    for data in (ema, raw, heun, cfg, cfg_all, unbalanced):
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (8, 32, 32, 3)
    for data in (ema, raw, heun, cfg):
        assert np.array_equal(data["arr_1"], np.arange(8))
    labels = unbalanced["arr_1"]
    assert labels.min() >= 0 and labels.max() < 8 and not np.array_equal(labels, np.arange(8))

    # EMA by default; --weights raw gives the raw weights' images, and they differ.
    module = load_module(ckpt)
    seeds = torch.arange(8)
    expected = module.generate(torch.arange(8), seeds)
    assert np.array_equal(ema["arr_0"], to_uint8(expected).permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(raw["arr_0"], ema["arr_0"])
    assert raw_job["weights_sha256"] != ema_job["weights_sha256"]

    # Heun keeps every other field of the configured sampler (4 steps, time_shift 2).
    assert ema_job["sampler"].startswith("EulerSampler(") and "time_shift=2.0" in ema_job["sampler"]
    assert heun_job["sampler"] == repr(HeunSampler(num_steps=4, time_shift=2.0))
    assert not np.array_equal(heun["arr_0"], ema["arr_0"])
    heun_images = module.generate(torch.arange(8), seeds, sampler=HeunSampler(num_steps=4, time_shift=2.0))
    assert np.array_equal(heun["arr_0"], to_uint8(heun_images).permute(0, 2, 3, 1).numpy())

    assert "cfg_scale=30.0" in cfg_job["sampler"] and "cfg_interval=(0.2, 0.9)" in cfg_job["sampler"]
    assert not np.array_equal(cfg["arr_0"], ema["arr_0"])
    assert not np.array_equal(cfg["arr_0"], cfg_all["arr_0"])
    guided = module.generate(torch.arange(8), seeds, cfg_scale=30.0, cfg_interval=(0.2, 0.9))
    assert np.array_equal(cfg["arr_0"], to_uint8(guided).permute(0, 2, 3, 1).numpy())


def test_sample_command_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        dip_main(["sample", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--weights",
        "--sampler",
        "--cfg_scale",
        "--cfg_interval",
        "--num_steps",
        "--no_balanced",
    ):
        assert flag in help_text


def test_predict_command_returns_uint8_images_of_the_ema_weights(ckpt: Path, tmp_path: Path) -> None:
    """``python -m dip_lightning predict --config experiments/tiny_cpu.yaml --ckpt_path ... --data
    dip_lightning.core.data.LabelSeedDataModule``: the network comes from the checkpoint's hyperparameters."""
    cli = DiPCLI(
        args=[
            "predict",
            "--config",
            TINY_CONFIG,
            "--ckpt_path",
            str(ckpt),
            "--data",
            "dip_lightning.core.data.LabelSeedDataModule",
            "--data.num_samples=6",
            "--data.batch_size=4",
            f"--trainer.default_root_dir={tmp_path / 'predict'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    batches = cli.trainer.predict_loop.predictions
    assert len(batches) == 2
    images = torch.cat([b["images"] for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.arange(6))
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(6))
    # The same pixels as the export of the same indices (EMA weights, same uint8 conversion).
    exported = export_samples(load_module(ckpt), tmp_path / "export.npz", 6, batch_size=6, chunk_size=6)
    assert exported is not None
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(load_npz(exported)["arr_0"]))


@pytest.mark.slow
def test_evaluate_command_on_an_export(
    ckpt: Path, tmp_path: Path, demo_data: dict, capsys: pytest.CaptureFixture
) -> None:
    import json

    samples = export_samples(load_module(ckpt), tmp_path / "samples.npz", 16, batch_size=16, chunk_size=16)
    assert samples is not None
    ref = tmp_path / "ref.npz"
    stats = ["fid-stats", "--shards", demo_data["val_shards"], "--image-size", "32", "--device", "cpu"]
    assert dip_main([*stats, "--out", str(ref), "--extractor", "pixel-projection"]) == 0
    out = tmp_path / "metrics.json"
    flags = ["--extractor", "pixel-projection", "--device", "cpu", "--json", str(out)]
    # The patch size comes from the checkpoint's stored config.
    assert dip_main(["evaluate", str(samples), str(ref), "--ckpt_path", str(ckpt), *flags]) == 0
    record = json.loads(out.read_text())
    assert record["patch_size"] == load_module(ckpt).net.patch_size
    assert np.isfinite(record["fid"]) and record["fid"] > 0 and record["num_samples"] == 16
    assert 0 <= record["precision"] <= 1 and record["patch_seam"] > 0
    assert "samples: 16" in capsys.readouterr().out

    # FID and IS, once with the default (Inception) network, on a handful of images: no IS (no classifier layer).
    ref_inception = tmp_path / "ref_inception.npz"
    assert dip_main([*stats, "--out", str(ref_inception), "--limit", "6"]) == 0
    fid = ["evaluate", str(samples), str(ref_inception), "--metrics", "fid", "inception_score"]
    fid += ["--limit", "6", "--device", "cpu", "--json", str(out)]
    assert dip_main(fid) == 0
    record = json.loads(out.read_text())
    assert np.isfinite(record["fid"]) and record["inception_score"] is None
    assert (
        record["extractor"].startswith("fid-helper")
        and "classifier" in record["unavailable"]["inception_score"]
    )


def test_checkpoint_trained_with_repa_samples_without_building_repa(tmp_path: Path, demo_data: dict) -> None:
    """Sampling never builds REPA (its encoder's weights file may not exist where samples are drawn)."""
    repa = (
        '--model.repa={"encoder": {"class_path": "tests.helpers.tiny_encoder.TinyViTEncoder", '
        '"init_args": {"dit_patch_size": 8, "grid_size": 4}}, "block": 1, "projector_dim": 32}'
    )
    cli, _ = fit_tiny(tmp_path, demo_data, repa, steps=2)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert any(k.startswith("repa.projector") for k in torch.load(ckpt, weights_only=False)["state_dict"])
    from_hparams = load_module(ckpt)
    assert from_hparams.repa is None
    from_yaml = load_module(ckpt, configs=[TINY_CONFIG, str(small_net_config(tmp_path))])
    assert from_yaml.repa is None
    labels, seeds = torch.tensor([0, 3]), torch.tensor([5, 6])
    assert torch.equal(
        from_hparams.generate(labels, seeds, num_steps=2), from_yaml.generate(labels, seeds, num_steps=2)
    )
    assert torch.equal(
        cli.model.net.state_dict()["x_embedder.proj.weight"], cli.model.net.x_embedder.proj.weight
    )


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_images(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # `sample --compile`: inductor kernels (on CPU here, ~1 minute of compiling) for both the unguided (B) and
    # the CFG (2B) batch shapes; the images must be the eager ones up to float rounding.
    flags = ["--num_samples", "4", "--chunk_size", "4", "--batch_size", "4", "--cfg_scale", "3"]
    flags += ["--cfg_interval", "0.2", "0.9"]
    eager_out, compiled_out = tmp_path / "eager.npz", tmp_path / "compiled.npz"
    assert dip_main(["sample", "--ckpt_path", str(ckpt), "--out", str(eager_out), *flags]) == 0
    assert (
        dip_main(["sample", "--ckpt_path", str(ckpt), "--out", str(compiled_out), *flags, "--compile"]) == 0
    )
    eager, compiled = load_npz(eager_out)["arr_0"], load_npz(compiled_out)["arr_0"]
    diff = np.abs(eager.astype(np.int16) - compiled.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    job = json.loads((compiled_out.with_name(compiled_out.name + ".parts") / "job.json").read_text())
    assert job["compile"] == "default"
    # An export started eager is not finished compiled (or the other way round).
    partial = tmp_path / "mixed.npz"
    module = load_module(ckpt)
    settings = {"num_samples": 8, "chunk_size": 4, "batch_size": 4}
    assert export_samples(module, partial, **settings, max_chunks=1) is None
    same = ["--num_samples", "8", "--chunk_size", "4", "--batch_size", "4"]
    capsys.readouterr()
    assert dip_main(["sample", "--ckpt_path", str(ckpt), "--out", str(partial), *same, "--compile"]) == 2
    assert re.search("another export.*compile", capsys.readouterr().err)


def test_x_prediction_checkpoint_exports_with_every_sampler(tmp_path: Path, demo_data: dict) -> None:
    """An x-prediction run samples through the same commands: the module converts its output to the velocity
    (one place), whichever ``--sampler``; the SDE's images depend only on (label, seed)."""
    from dip_lightning.core.diffusion import SAMPLERS

    fit_tiny(
        tmp_path, demo_data, "--model.flow.prediction=x", "--model.sampler.init_args.num_steps=3", steps=2
    )
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    assert module.flow.prediction == "x"
    labels, seeds = torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9])
    for name in SAMPLERS:
        out = tmp_path / f"{name}.npz"
        assert (
            dip_main(
                ["sample", "--ckpt_path", str(ckpt), "--out", str(out), "--num_samples", "3"]
                + ["--sampler", name, "--batch_size", "2"]
            )
            == 0
        )
        images = load_npz(out)["arr_0"]
        assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
        sampler = SAMPLERS[name](num_steps=3)
        direct = to_uint8(module.generate(labels, seeds, sampler)).permute(0, 2, 3, 1).numpy()
        alone = to_uint8(module.generate(labels[1:2], seeds[1:2], sampler)).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(direct[1:2], alone)  # an image does not depend on its batch, SDE included
    # The conversion is applied: generate equals the sampler run on the converted network, not on the raw one.
    sampler = SAMPLERS["euler"](num_steps=3)
    noise = make_noise(seeds, module.image_shape)
    with torch.no_grad():
        converted = sampler.sample(
            module.flow.velocity_model(module.net), noise, labels, module.net.null_class
        )
        assert torch.equal(module.generate(labels, seeds, sampler), converted.float())
        raw = sampler.sample(module.net, noise, labels, module.net.null_class)
    assert not torch.allclose(raw, converted)


def test_sample_help_lists_every_sampler(capsys: pytest.CaptureFixture) -> None:
    from dip_lightning.core.diffusion import SAMPLERS

    with pytest.raises(SystemExit):
        dip_main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, cls in SAMPLERS.items():
        assert name in help_text and f"dip_lightning.core.diffusion.{cls.__name__}" in help_text
