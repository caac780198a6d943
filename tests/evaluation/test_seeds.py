"""Evaluation over several sample seeds: the seed rules and spreads, ``sample --seeds``, and the image of index i
depending only on (seed, i): not on the batch size nor on the number of processes.

The checkpoint: a 2-step fit of the tiny config (8 classes, 32 px) with a 2-step Euler sampler; exports are a few
images. The two-process export starts real ``torchrun`` processes (seconds of imports each): marked slow.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dip_lightning.commands import run_command
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.images import to_uint8
from dip_lightning.evaluation.seeds import metric_spreads, resolve_seeds, seed_path, spread
from dip_lightning.training.loading import load_module
from tests.helpers.tiny import HIGH_LR, REPO, fit_with, subprocess_env, tiny_args

NUM_CLASSES = 8  # the demo dataset's


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> Path:
    run_dir = tmp_path_factory.mktemp("seeds_run") / "run"
    fit_with(
        tiny_args(
            run_dir,
            demo_data,
            HIGH_LR,
            "--checkpoint.every_n_train_steps=2",
            "--model.sampler.init_args.num_steps=2",
            steps=2,
        )
    )
    return run_dir / "checkpoints" / "last.ckpt"


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


# ------------------------------------------------------------------------------------------------ rules
def test_spread_is_mean_sample_std_and_range() -> None:
    values = [3.0, 5.0, 10.0]
    stats = spread(values)
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(6.0)
    assert stats["std"] == pytest.approx(float(np.std(values, ddof=1)))  # n - 1: an unbiased variance
    assert (stats["min"], stats["max"]) == (3.0, 10.0)
    # A seed whose metric could not be computed is left out, and counted so; one value has no deviation.
    assert spread([2.0, None, math.nan]) == {"n": 1, "mean": 2.0, "std": None, "min": 2.0, "max": 2.0}
    assert spread([None])["mean"] is None
    by_metric = metric_spreads([{"fid": 1.0, "recall": None}, {"fid": 3.0, "recall": 0.5}])
    assert by_metric["fid"]["mean"] == 2.0 and by_metric["fid"]["std"] == pytest.approx(math.sqrt(2))
    assert by_metric["recall"]["n"] == 1


def test_seed_rules() -> None:
    assert resolve_seeds(7, None, 100) == [7]
    assert resolve_seeds(0, [0, 100, 200], 100) == [0, 100, 200]
    # Seeds 0 1 2 of 100 images would share 99 of their noise seeds (seed + i): refused, with seeds that work.
    with pytest.raises(ConfigError, match=r"less than --num_samples 100 apart.*--seeds 0 100 200"):
        resolve_seeds(0, [0, 1, 2], 100)
    with pytest.raises(ConfigError, match="give one of them"):
        resolve_seeds(5, [0, 100], 100)
    with pytest.raises(ConfigError, match="twice"):
        resolve_seeds(0, [0, 0])
    assert seed_path("out/s.npz", 3, [3]) == Path("out/s.npz")
    assert seed_path("out/s.npz", 300, [0, 300]) == Path("out/s_seed300.npz")


# ------------------------------------------------------------------------------------------------ sample
def test_sample_seeds_write_one_file_per_seed(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["sample", "--ckpt_path", str(ckpt), "--num_samples", "8", "--batch_size", "4"]
    out = tmp_path / "s.npz"
    assert run_command([*base, "--out", str(out), "--seeds", "0", "8", "16"]) == 0
    files = [tmp_path / f"s_seed{s}.npz" for s in (0, 8, 16)]
    assert all(p.is_file() for p in files) and not out.exists()
    # Each seed's file is what `sample --seed s` writes; labels are class-balanced in every one.
    single = tmp_path / "single8.npz"
    assert run_command([*base, "--out", str(single), "--seed", "8"]) == 0
    assert files[1].read_bytes() == single.read_bytes()
    arrays = [load_npz(p) for p in files]
    for a in arrays:
        assert np.array_equal(a["arr_1"], np.arange(8) % NUM_CLASSES)
    assert not np.array_equal(arrays[0]["arr_0"], arrays[1]["arr_0"])
    capsys.readouterr()
    # Overlapping seeds and an existing file of a later seed are refused before any image is made.
    assert run_command([*base, "--out", str(tmp_path / "o.npz"), "--seeds", "0", "1"]) == 2
    assert "less than --num_samples 8 apart" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in files}
    assert run_command([*base, "--out", str(out), "--seeds", "24", "16"]) == 2
    assert "s_seed16.npz exist" in capsys.readouterr().err
    assert not (tmp_path / "s_seed24.npz").exists()
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_an_image_depends_on_its_seed_and_index_only_not_on_the_batch(ckpt: Path) -> None:
    """The same batches give the same images bitwise; batches of 8 and of 3 agree to float32 rounding (CPU
    matrix kernels may sum in another order for another batch shape), which can move a uint8 pixel by at most
    one level where a value lies on a rounding boundary. The noise itself is per image (its own generator)."""
    module = load_module(ckpt)
    labels, seeds = torch.arange(8) % NUM_CLASSES, torch.arange(8) + 100
    whole = module.generate(labels, seeds)
    assert torch.equal(whole, module.generate(labels, seeds))
    pieces = torch.cat([module.generate(labels[i : i + 3], seeds[i : i + 3]) for i in range(0, 8, 3)])
    # A few units in the last place of values of magnitude ~5: rounding, not another image.
    assert (whole - pieces).abs().max() <= 1e-6
    levels = (to_uint8(whole).int() - to_uint8(pieces).int()).abs()
    assert levels.max() <= 1 and (levels > 0).float().mean() < 1e-3
    # Another image of the batch (another label or seed) changes nothing of image 0.
    other = module.generate(torch.tensor([0, 5]), torch.tensor([100, 7]))
    assert (other[0] - whole[0]).abs().max() <= 1e-6 and not torch.allclose(other[1], whole[1])


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_export_is_the_same_for_one_and_two_processes_and_any_batch_size(ckpt: Path, tmp_path: Path) -> None:
    """One process against two torchrun processes taking chunks of 4 round-robin, batches of 4 in both: the same
    npz files, byte for byte, for every seed. Batches of 3 instead: the same labels, and images equal to float
    rounding (at most one uint8 level on a rare pixel; see the test above)."""
    flags = ["--ckpt_path", str(ckpt), "--num_samples", "16", "--seeds", "0", "16"]
    one, three = tmp_path / "one.npz", tmp_path / "three.npz"
    assert run_command(["sample", *flags, "--out", str(one), "--batch_size", "4", "--chunk_size", "16"]) == 0
    assert run_command(["sample", *flags, "--out", str(three), "--batch_size", "3", "--chunk_size", "8"]) == 0
    two = tmp_path / "two.npz"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "dip_lightning", "sample", *flags, "--out", str(two), "--batch_size", "4"]
        + ["--chunk_size", "4"],
        cwd=REPO,
        env=subprocess_env(threads=1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(rank 1)" in done.stdout  # rank 1 made chunks of its own
    for seed in (0, 16):
        a = load_npz(tmp_path / f"one_seed{seed}.npz")
        b = load_npz(tmp_path / f"two_seed{seed}.npz")
        c = load_npz(tmp_path / f"three_seed{seed}.npz")
        assert np.array_equal(a["arr_1"], np.arange(16) % NUM_CLASSES)  # 2 images of each class
        assert np.array_equal(a["arr_1"], b["arr_1"]) and np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], c["arr_1"])
        levels = np.abs(a["arr_0"].astype(int) - c["arr_0"].astype(int))
        assert levels.max() <= 1 and (levels > 0).mean() < 1e-3
    # ...and they are the images of (label i % C, noise seed seed + i), in batches of 4 as exported.
    module = load_module(ckpt)
    labels, noise_seeds = torch.arange(16) % NUM_CLASSES, torch.arange(16) + 16
    expected = torch.cat(
        [module.generate(labels[i : i + 4], noise_seeds[i : i + 4]) for i in range(0, 16, 4)]
    )
    assert np.array_equal(
        load_npz(tmp_path / "two_seed16.npz")["arr_0"], to_uint8(expected).permute(0, 2, 3, 1).numpy()
    )
