"""The 512 px recipe builds at full size, and `fit --init_from` transfers the expected weights, those
`--init_from_weights` asks for (real CLI runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from dip_lightning.checkpoint.compatibility import CheckpointMismatchError
from dip_lightning.checkpoint.format import select_weights
from dip_lightning.checkpoint.io import CheckpointError, read_checkpoint
from dip_lightning.core.models.backbone import PatchEmbed, patchify
from dip_lightning.core.models.heads import PatchDetailerHead
from dip_lightning.training.cli import DiPCLI
from dip_lightning.training.init_from import PATCH_EMBED_KEY, upsample_patch_embed
from tests.helpers.tiny import HIGH_LR, REPO, fit_with, tiny_args

RECIPE_512 = REPO / "experiments" / "dip_xl32_512.yaml"


def test_512_recipe_builds_the_full_model_on_the_meta_device() -> None:
    net_config = yaml.safe_load(RECIPE_512.read_text())["model"]["net"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=torch.nn.Module)
    cfg = parser.parse_object({"net": net_config})
    with torch.device("meta"):
        net = parser.instantiate(cfg).net
    assert (net.input_size, net.patch_size, net.hidden_size, net.depth) == (512, 32, 1152, 26)
    assert net.x_embedder.proj.weight.shape == (1152, 3 * 32 * 32)
    assert isinstance(net.head, PatchDetailerHead) and net.head.patch_size == 32
    assert 32 >> len(net.head.widths) == 2  # the 2x2 bottleneck the token is tiled over
    assert sum(p.numel() for p in net.parameters()) == 634_643_619  # the figure the YAML's header states


def test_upsampled_patch_embedding_maps_a_2x_enlarged_image_to_the_same_tokens() -> None:
    torch.manual_seed(0)
    small = PatchEmbed(4, 3, 16)
    large = PatchEmbed(8, 3, 16)
    with torch.no_grad():
        large.proj.weight.copy_(upsample_patch_embed(small.proj.weight, 3, 4, 8))
        large.proj.bias.copy_(small.proj.bias)
    image = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    enlarged = torch.nn.functional.interpolate(image, scale_factor=2, mode="nearest")
    small, large = small.double(), large.double()
    torch.testing.assert_close(large(patchify(enlarged, 8)), small(patchify(image, 4)))
    with pytest.raises(ValueError, match="multiple"):
        upsample_patch_embed(small.proj.weight, 3, 4, 6)


@pytest.fixture(scope="module")
def demo_data_64(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from dip_lightning.core.data.demo_dataset import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo64"), size=64, train_per_class=8, val_per_class=2)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> Path:
    """A 2-step tiny run at 32 px with 8x8 patches (the '256 px' side)."""
    run = tmp_path_factory.mktemp("source") / "run"
    fit_with(tiny_args(run, demo_data, steps=2))
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("mode", ["reinit", "upsample"])
def test_init_from_transfers_everything_but_the_grown_patch_embedding(
    tmp_path: Path, demo_data_64: dict, source_run: Path, mode: str
) -> None:
    source = torch.load(source_run, map_location="cpu", weights_only=True)["state_dict"]
    out = tmp_path / "start.pt"
    args = tiny_args(
        tmp_path / "run",
        demo_data_64,
        f"--init_from={source_run}",
        f"--init_patch_embed={mode}",
        "--model.net.init_args.input_size=64",
        "--model.net.init_args.patch_size=16",
        steps=1,
    )
    args += [
        "--trainer.callbacks+=tests.helpers.init_probe.StartWeights",
        f"--trainer.callbacks.init_args.out={out}",
    ]
    cli = DiPCLI(args=["fit", *args])
    start = torch.load(out, weights_only=True)
    assert start.keys() == source.keys()
    for name, tensor in start.items():
        if name != PATCH_EMBED_KEY:
            assert torch.equal(tensor, source[name]), (
                name
            )  # blocks, embeddings, head, biases: all transferred
    grown = start[PATCH_EMBED_KEY]
    assert grown.shape == (64, 3 * 16 * 16) and source[PATCH_EMBED_KEY].shape == (64, 3 * 8 * 8)
    if mode == "upsample":
        assert torch.equal(grown, upsample_patch_embed(source[PATCH_EMBED_KEY], 3, 8, 16))
    else:
        assert not torch.equal(grown, upsample_patch_embed(source[PATCH_EMBED_KEY], 3, 8, 16))
    # Weights only: the trainer state starts fresh.
    assert cli.trainer.global_step == 1


def test_init_from_another_width_is_an_error_that_lists_the_tensors(
    tmp_path: Path, demo_data: dict, source_run: Path
) -> None:
    args = tiny_args(
        tmp_path / "run", demo_data, f"--init_from={source_run}", "--model.net.init_args.hidden_size=32"
    )
    with pytest.raises(CheckpointMismatchError, match=r"do not match the checkpoint \(.*blocks\.0\."):
        DiPCLI(args=["fit", *args])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_and_ckpt_path_exclude_each_other(
    tmp_path: Path, demo_data: dict, source_run: Path
) -> None:
    from dip_lightning.training.cli import DiPCLI

    args = tiny_args(tmp_path / "run", demo_data, f"--init_from={source_run}", f"--ckpt_path={source_run}")
    with pytest.raises(ValueError, match="exclude each other"):
        DiPCLI(args=["fit", *args])


@pytest.fixture(scope="module")
def ema_source(tmp_path_factory: pytest.TempPathFactory, demo_data: dict) -> Path:
    """A 4-step tiny run with EMA decays 0.5 and 0.8 and power-function profiles (snapshots every 2 steps)."""
    run = tmp_path_factory.mktemp("ema_source") / "run"
    callbacks = [
        {"class_path": "dip_lightning.training.callbacks.EMA", "init_args": {"decays": [0.5, 0.8]}},
        {
            "class_path": "dip_lightning.training.callbacks.PowerFunctionEMA",
            "init_args": {"stds": [0.1, 0.2], "snapshot_every_n_steps": 2},
        },
    ]
    fit_with(tiny_args(run, demo_data, HIGH_LR, steps=4, callbacks=callbacks))
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("request_text", [None, "ema:0.8", "raw", "phema:0.15"])
def test_init_from_weights_takes_the_weights_select_weights_chooses(
    tmp_path: Path, demo_data: dict, ema_source: Path, request_text: str | None
) -> None:
    out = tmp_path / "start.pt"
    chosen = ["--init_from_weights", request_text] if request_text else []
    args = tiny_args(tmp_path / "run", demo_data, f"--init_from={ema_source}", *chosen, steps=1)
    args += [
        "--trainer.callbacks+=tests.helpers.init_probe.StartWeights",
        f"--trainer.callbacks.init_args.out={out}",
    ]
    DiPCLI(args=["fit", *args])
    start = torch.load(out, weights_only=True)
    expected = select_weights(read_checkpoint(ema_source), ema_source, request_text or "ema")
    assert start.keys() == expected.keys()
    for name, tensor in start.items():
        assert torch.equal(tensor, expected[name]), name
    if request_text is not None:  # not vacuous: these differ from the default
        default = read_checkpoint(ema_source)["state_dict"]
        assert any(not torch.equal(start[k], default[k]) for k in start)


def test_init_from_weights_needs_init_from_and_tracked_weights(
    tmp_path: Path, demo_data: dict, ema_source: Path
) -> None:
    with pytest.raises(ValueError, match="--init_from_weights chooses weights of --init_from"):
        DiPCLI(args=["fit", *tiny_args(tmp_path / "a", demo_data, "--init_from_weights=raw")])
    args = tiny_args(tmp_path / "b", demo_data, f"--init_from={ema_source}", "--init_from_weights=ema:0.9")
    with pytest.raises(CheckpointError, match=r"no EMA of decay 0\.9.*ema:0\.5, ema:0\.8"):
        DiPCLI(args=["fit", *args])
    assert not (tmp_path / "b" / "checkpoints").exists()
