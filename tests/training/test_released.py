"""The released-weights converter: exactness against an independent re-implementation of the released
forward, round trips, containers/prefixes/EMA choice, clear errors, and converted checkpoints through
sample/predict/validate.

The released code (NJU-PCALab/DiP ``src/models/transformer/dip.py``) cannot be imported here, so this file
holds its own small reference: :func:`released_layout` (names and shapes) and :func:`released_forward` (math),
written from reading that file and operating directly on a released-layout state dict. It shares no code
with ``dip_lightning`` (unfold/fold instead of reshapes, complex RoPE instead of cos/sin, explicit softmax
attention instead of SDPA, functional convolutions instead of modules).
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from dip_lightning.__main__ import main as dip_main
from dip_lightning.checkpoint.compatibility import CheckpointMismatchError
from dip_lightning.commands.convert import main
from dip_lightning.core.models import DiP, PatchDetailerHead, create_model
from dip_lightning.training.released import (
    ConversionError,
    convert_checkpoint,
    extract_official_state_dict,
    infer_official_arch,
    kit_hyperparameters,
    kit_to_official,
    official_layout,
    official_to_kit,
)
from tests.helpers import REPO
from tests.helpers.commands import run_command, user_error
from tests.helpers.tiny import fit_tiny

torch.set_num_threads(1)

XL_YAML = REPO / "experiments" / "dip_xl16.yaml"

# Tiny released configuration: 32 px images on 16 px patches (2x2 tokens), the released head at full width.
TINY = {"hidden_size": 64, "depth": 2, "num_heads": 2, "patch_size": 16, "in_channels": 3, "num_classes": 8}
XL = {
    "hidden_size": 1152,
    "depth": 26,
    "num_heads": 16,
    "patch_size": 16,
    "in_channels": 3,
    "num_classes": 1000,
}


# ------------------------------------------------------------------------------------------------------------
# Independent reference of the released module
# ------------------------------------------------------------------------------------------------------------
def released_layout(
    hidden_size: int, depth: int, num_heads: int, patch_size: int, in_channels: int, num_classes: int
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the released DiP's parameters, as read in its source."""
    d, c, p = hidden_size, in_channels, patch_size
    ffn = int(2 * int(d * 4.0) / 3)  # FeedForward(dim, int(dim * mlp_ratio)) -> int(2 * hidden / 3)
    shapes: dict[str, tuple[int, ...]] = {
        "s_embedder.proj.weight": (d, c * p * p),  # Embed: nn.Linear(in_chans=C*P*P, D); its norm is Identity
        "s_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),  # LabelEmbedder(num_classes + 1)
    }
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.norm1.weight": (d,),
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.q_norm.weight": (d // num_heads,),
            f"blocks.{i}.attn.k_norm.weight": (d // num_heads,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.norm2.weight": (d,),
            f"blocks.{i}.mlp.w1.weight": (ffn, d),
            f"blocks.{i}.mlp.w2.weight": (d, ffn),
            f"blocks.{i}.mlp.w3.weight": (ffn, d),
            f"blocks.{i}.adaLN_modulation.0.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.0.bias": (6 * d,),
        }
    convs = {
        "enc1.0": (64, c, 3, 3),
        "enc2.0": (128, 64, 3, 3),
        "enc3.0": (256, 128, 3, 3),
        "enc4.0": (512, 256, 3, 3),
        "bottleneck.0": (512, 512 + d, 1, 1),
        "up4": (512, 512, 2, 2),  # ConvTranspose2d weight: (in, out, kh, kw)
        "dec4.0": (256, 1024, 3, 3),
        "up3": (256, 256, 2, 2),
        "dec3.0": (128, 512, 3, 3),
        "up2": (128, 128, 2, 2),
        "dec2.0": (64, 256, 3, 3),
        "up1": (64, 64, 2, 2),
        "dec1.0": (64, 128, 3, 3),
        "out_conv": (c, 64, 1, 1),
    }
    for name, shape in convs.items():
        out_ch = shape[1] if name.startswith("up") else shape[0]
        shapes[f"local_decoder.{name}.weight"] = shape
        shapes[f"local_decoder.{name}.bias"] = (out_ch,)
    return shapes


def meta_released_state_dict(**arch: int) -> dict[str, Tensor]:
    """A released-layout state dict of meta tensors (shapes only, no memory)."""
    return {k: torch.empty(s, device="meta") for k, s in released_layout(**arch).items()}


def random_released_state_dict(seed: int = 0, **arch: int) -> dict[str, Tensor]:
    """Random released-layout weights, scaled so activations stay O(1) and every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in released_layout(**arch).items():
        if "norm" in name:  # RMSNorm weights: not all ones, so a swapped norm would show
            value = 1.0 + 0.3 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif "embedding_table" in name:
            value = torch.randn(shape, generator=g)
        else:
            fan_in = shape[0] if "local_decoder.up" in name else math.prod(shape[1:])
            value = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = value
    return out


def _rms(x: Tensor, w: Tensor) -> Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _lin(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def released_forward(
    sd: dict[str, Tensor],
    x: Tensor,
    t: Tensor,
    y: Tensor,
    num_heads: int,
    patch_size: int,
    swap_xy: bool = False,
) -> Tensor:
    """The released DiP.forward(x, t, y) on a released-layout state dict. ``swap_xy`` is a control only."""
    b, c, h, w = x.shape
    p = patch_size
    d = sd["s_embedder.proj.weight"].shape[0]
    hd = d // num_heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    gh, gw = h // p, w // p

    # precompute_freqs_cis_2d(head_dim, gh, gw): positions linspace(0, 16, n), x/y interleaved complex pairs
    ys, xs = torch.meshgrid(torch.linspace(0, 16.0, gh), torch.linspace(0, 16.0, gw), indexing="ij")
    xs, ys = (ys, xs) if swap_xy else (xs, ys)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 4)[: hd // 4].float() / hd))
    x_cis = torch.polar(torch.ones(gh * gw, hd // 4), torch.outer(xs.reshape(-1), freqs))
    y_cis = torch.polar(torch.ones(gh * gw, hd // 4), torch.outer(ys.reshape(-1), freqs))
    cis = torch.stack([x_cis, y_cis], dim=-1).reshape(gh * gw, -1)  # (N, hd/2)

    def rotate(q: Tensor) -> Tensor:  # q: (B, N, heads, hd)
        qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        return torch.view_as_real(qc * cis[None, :, None, :]).flatten(3).type_as(q)

    tokens = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*P*P)
    n = tokens.shape[1]
    half = 128
    f = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * f[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = _lin(F.silu(_lin(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2").view(b, 1, d)
    yemb = sd["y_embedder.embedding_table.weight"][y].view(b, 1, d)
    cond = F.silu(temb + yemb)

    s = _lin(tokens, sd, "s_embedder.proj")
    for i in range(depth):
        pre = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = _lin(cond, sd, pre + "adaLN_modulation.0").chunk(6, dim=-1)
        a = _rms(s, sd[pre + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = _lin(a, sd, pre + "attn.qkv").reshape(b, n, 3, num_heads, hd).permute(2, 0, 1, 3, 4)
        q = rotate(_rms(qkv[0], sd[pre + "attn.q_norm.weight"])).transpose(1, 2)
        k = rotate(_rms(qkv[1], sd[pre + "attn.k_norm.weight"])).transpose(1, 2)
        v = qkv[2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        s = s + g1 * _lin(att.transpose(1, 2).reshape(b, n, d), sd, pre + "attn.proj")
        m = _rms(s, sd[pre + "norm2.weight"]) * (1 + sc2) + sh2
        ffn = _lin(F.silu(_lin(m, sd, pre + "mlp.w1")) * _lin(m, sd, pre + "mlp.w3"), sd, pre + "mlp.w2")
        s = s + g2 * ffn
    s = F.silu(temb + s)

    # LocalDecoder on every patch, the token tiled over the (P/16)^2 bottleneck
    def conv(z: Tensor, name: str, pad: int) -> Tensor:
        return F.conv2d(z, sd[f"local_decoder.{name}.weight"], sd[f"local_decoder.{name}.bias"], padding=pad)

    def up(z: Tensor, name: str) -> Tensor:
        return F.conv_transpose2d(
            z, sd[f"local_decoder.{name}.weight"], sd[f"local_decoder.{name}.bias"], stride=2
        )

    s_global = s.reshape(b * n, d, 1, 1).repeat(1, 1, p // 16, p // 16)
    z = tokens.reshape(b * n, c, p, p)
    e1 = F.silu(conv(z, "enc1.0", 1))
    e2 = F.silu(conv(F.max_pool2d(e1, 2, 2), "enc2.0", 1))
    e3 = F.silu(conv(F.max_pool2d(e2, 2, 2), "enc3.0", 1))
    e4 = F.silu(conv(F.max_pool2d(e3, 2, 2), "enc4.0", 1))
    z = F.silu(conv(torch.cat([F.max_pool2d(e4, 2, 2), s_global], dim=1), "bottleneck.0", 0))
    z = F.silu(conv(torch.cat([up(z, "up4"), e4], dim=1), "dec4.0", 1))
    z = F.silu(conv(torch.cat([up(z, "up3"), e3], dim=1), "dec3.0", 1))
    z = F.silu(conv(torch.cat([up(z, "up2"), e2], dim=1), "dec2.0", 1))
    z = F.silu(conv(torch.cat([up(z, "up1"), e1], dim=1), "dec1.0", 1))
    out = conv(z, "out_conv", 0)
    return F.fold(out.reshape(b, n, c * p * p).transpose(1, 2), (h, w), kernel_size=p, stride=p)


def tiny_kit_model(**overrides) -> DiP:
    """The kit's DiP for TINY, built from its own arguments (not from the converter's)."""
    return DiP(input_size=32, **{**{k: v for k, v in TINY.items()}, **overrides})


@pytest.fixture(scope="module")
def released_sd() -> dict[str, Tensor]:
    return random_released_state_dict(seed=0, **TINY)


def lightning_released_checkpoint(sd: dict[str, Tensor], live_offset: float = 0.5) -> dict:
    """What the released LightningModel saves: denoiser./ema_denoiser. copies and the REPA projector."""
    g = torch.Generator().manual_seed(1)
    d = TINY["hidden_size"]
    proj = {}
    for i, (o, n) in zip((0, 2, 4), ((d, d), (d, d), (32, d))):
        proj[f"diffusion_trainer.proj.0.{i}.weight"] = torch.randn(o, n, generator=g)
        proj[f"diffusion_trainer.proj.0.{i}.bias"] = torch.randn(o, generator=g)
    return {
        "epoch": 599,
        "global_step": 3_000_000,
        "state_dict": {
            **{f"denoiser.{k}": v + live_offset for k, v in sd.items()},
            **{f"ema_denoiser.{k}": v for k, v in sd.items()},
            **proj,
        },
    }


# ------------------------------------------------------------------------------------------------------------
# The same function as the released module
# ------------------------------------------------------------------------------------------------------------
def test_reference_layout_is_the_converters_layout_at_xl():
    """The converter's idea of the released layout equals this file's independent reading, at DiP-XL/16."""
    ours = official_layout(infer_official_arch(meta_released_state_dict(**XL)))
    assert ours == released_layout(**XL)
    assert sum(math.prod(s) for s in ours.values()) == 631_989_411  # paper: 631M


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (32, 64)], ids=["2x2", "4x4", "2x4"])
def test_converted_model_computes_the_released_function(released_sd, size):
    net = tiny_kit_model().eval()
    net.load_state_dict(official_to_kit(released_sd), strict=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, *size, generator=g)
    t = torch.tensor([0.0, 0.37, 0.99])
    y = torch.tensor([0, 5, TINY["num_classes"]])  # the last one is the null class
    with torch.no_grad():
        ours = net(x, t, y)
        ref = released_forward(released_sd, x, t, y, TINY["num_heads"], TINY["patch_size"])
    assert ref.abs().mean() > 0.1  # a non-trivial output
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    if size[0] != size[1]:  # control: the comparison is sensitive to the RoPE axis convention
        swapped = released_forward(released_sd, x, t, y, TINY["num_heads"], TINY["patch_size"], swap_xy=True)
        assert (swapped - ref).abs().max() > 1e-3


def test_xl_key_set_and_shapes_match_the_kit_model_exactly():
    """Every released DiP-XL/16 tensor lands on a kit tensor of the same shape and back (meta: no memory)."""
    official = meta_released_state_dict(**XL)
    kit = official_to_kit(official)
    with torch.device("meta"):
        model = create_model("DiP-XL/16")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in kit.items()} == expected
    assert {id(v) for v in kit.values()} == {id(v) for v in official.values()}  # renamed, never copied
    model.load_state_dict(kit, strict=True, assign=True)


# ------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------
def test_round_trip_kit_official_kit_is_the_identity_on_every_tensor():
    torch.manual_seed(0)
    net = tiny_kit_model()
    for p in net.parameters():  # not the init: every tensor distinct
        p.data.normal_()
    sd = net.state_dict()
    back = official_to_kit(kit_to_official(sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with torch.device("meta"):  # and at full size, on meta tensors (the same objects come back)
        xl = create_model("DiP-XL/16").state_dict()
    xl_back = official_to_kit(kit_to_official(xl))
    assert set(xl_back) == set(xl) and all(xl_back[k] is v for k, v in xl.items())


def test_checkpoint_round_trip_keeps_ema_raw_and_projector(tmp_path, released_sd):
    src = tmp_path / "official.ckpt"
    torch.save(lightning_released_checkpoint(released_sd), src)
    convert_checkpoint(src, tmp_path / "kit.ckpt", input_size=32)
    assert main([str(tmp_path / "kit.ckpt"), "--from", "kit", "--out", str(tmp_path / "official2.ckpt")]) == 0
    convert_checkpoint(tmp_path / "official2.ckpt", tmp_path / "kit2.ckpt", input_size=32)
    first = torch.load(tmp_path / "kit.ckpt", weights_only=True)
    second = torch.load(tmp_path / "kit2.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state", "repa_projector"):
        assert set(first[key]) == set(second[key]), key
        assert all(torch.equal(first[key][k], second[key][k]) for k in first[key]), key
    assert first["hyper_parameters"] == second["hyper_parameters"]
    # and the official file written in between is the released layout, tensor for tensor
    official2 = torch.load(tmp_path / "official2.ckpt", weights_only=True)["state_dict"]
    original = torch.load(src, weights_only=True)["state_dict"]
    assert set(official2) == set(original)
    assert all(torch.equal(official2[k], original[k]) for k in original)


# ------------------------------------------------------------------------------------------------------------
# Containers, prefixes, EMA
# ------------------------------------------------------------------------------------------------------------
def test_lightning_checkpoint_prefers_ema_and_says_so(released_sd):
    sd, text = extract_official_state_dict(lightning_released_checkpoint(released_sd))
    assert set(sd) == set(released_sd) and all(torch.equal(sd[k], released_sd[k]) for k in sd)
    assert "EMA" in text and "ema_denoiser" in text and "live" in text
    live, text = extract_official_state_dict(lightning_released_checkpoint(released_sd), weights="live")
    assert torch.equal(live["s_embedder.proj.bias"], released_sd["s_embedder.proj.bias"] + 0.5)
    assert "live" in text


@pytest.mark.parametrize("wrap", ["bare", "module.", "_orig_mod.", "module.ema_denoiser.", "state_dict"])
def test_containers_and_wrappers(released_sd, wrap):
    if wrap == "bare":
        obj = dict(released_sd)
    elif wrap == "state_dict":
        obj = {"state_dict": dict(released_sd), "epoch": 1}
    else:
        obj = {"state_dict": {wrap + k: v for k, v in released_sd.items()}}
    sd, text = extract_official_state_dict(obj)
    assert set(sd) == set(released_sd) and all(sd[k] is released_sd[k] for k in sd)
    assert ("Lightning checkpoint" in text) == (wrap != "bare")
    if wrap == "module.ema_denoiser.":
        assert "EMA weights 'ema_denoiser.*'" in text and "removed wrapper prefixes" in text
    else:  # no released groups: taken as they are, and the text says EMA-or-not is unknown
        assert "unprefixed weights" in text and "cannot be told" in text


def test_live_only_checkpoint_and_insisting_on_ema(released_sd):
    obj = {"state_dict": {f"denoiser.{k}": v for k, v in released_sd.items()}}
    _, text = extract_official_state_dict(obj)
    assert "live" in text and "no EMA" in text
    with pytest.raises(ConversionError, match="no EMA weights"):
        extract_official_state_dict(obj, weights="ema")


def test_unknown_group_in_a_lightning_checkpoint_is_an_error(released_sd):
    obj = lightning_released_checkpoint(released_sd)
    obj["state_dict"]["extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="extra_head.weight"):
        extract_official_state_dict(obj)


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------
def test_renamed_key_fails_naming_both_keys(released_sd):
    sd = dict(released_sd)
    sd["blocks.1.attn.qkv_proj.weight"] = sd.pop("blocks.1.attn.qkv.weight")
    with pytest.raises(ConversionError) as err:
        official_to_kit(sd)
    msg = str(err.value)
    assert "missing (1): blocks.1.attn.qkv.weight" in msg
    assert "unexpected (1): blocks.1.attn.qkv_proj.weight" in msg
    assert "Nothing was converted" in msg


def test_missing_key_and_wrong_shape_fail(released_sd):
    sd = dict(released_sd)
    del sd["local_decoder.out_conv.bias"]
    sd["blocks.0.mlp.w1.weight"] = torch.zeros(100, TINY["hidden_size"])
    with pytest.raises(ConversionError) as err:
        official_to_kit(sd)
    assert "local_decoder.out_conv.bias" in str(err.value)
    assert "blocks.0.mlp.w1.weight (100, 64) (expected (170, 64))" in str(err.value)


def test_not_a_dip_state_dict_and_kit_models_the_release_cannot_compute():
    with pytest.raises(ConversionError, match="not a released DiP state dict"):
        official_to_kit({"encoder.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match="--from kit"):  # a kit file given as released
        official_to_kit({f"net.{k}": v for k, v in tiny_kit_model().state_dict().items()})
    small_head = tiny_kit_model(head=functools.partial(PatchDetailerHead, base_channels=8))
    with pytest.raises(ConversionError, match=r"head\.enc\.0\.0\.weight \(8, 3, 3, 3\)"):
        kit_to_official(small_head.state_dict())
    small_patches = tiny_kit_model(patch_size=8, head=functools.partial(PatchDetailerHead, depth=3))
    with pytest.raises(ConversionError, match="no released DiP has .*patch_size=8.*not divisible"):
        kit_to_official(small_patches.state_dict())


def test_kit_options_without_a_released_equivalent_refuse_to_convert(tmp_path):
    """rope_scale=None keeps every tensor name but changes the function: the released module cannot run it."""
    net = tiny_kit_model(rope_scale=None)
    hparams = {"net": {"class_path": "dip_lightning.core.models.DiP", "init_args": {"rope_scale": None}}}
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams},
        tmp_path / "kit.ckpt",
    )
    with pytest.raises(ConversionError, match=r"rope_scale=None \(released: 16.0\)"):
        convert_checkpoint(tmp_path / "kit.ckpt", tmp_path / "out.ckpt", direction="kit_to_official")
    assert not (tmp_path / "out.ckpt").exists()


def test_cli_error_exit_code_and_nothing_written(tmp_path, released_sd, capsys):
    sd = dict(released_sd)
    sd["blocks.0.attn.qkv_proj.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    torch.save({"state_dict": {f"ema_denoiser.{k}": v for k, v in sd.items()}}, tmp_path / "bad.ckpt")
    out = tmp_path / "out.ckpt"
    assert dip_main(["convert", str(tmp_path / "bad.ckpt"), "--from", "official", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn.qkv.weight" in err and "blocks.0.attn.qkv_proj.weight" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_kit_run(tmp_path_factory, demo_data) -> Path:
    """last.ckpt of a 1-step tiny run on the released 16 px patches: its small head (3 stages of 8-32 channels)
    has no released equivalent."""
    folder = tmp_path_factory.mktemp("tiny_kit_run")
    fit_tiny(folder, demo_data, "--model.net.init_args.patch_size=16", steps=1)
    return folder / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "not_a_checkpoint", "kit_network_the_release_cannot_run"])
def test_convert_command_errors_name_the_file_the_problem_and_the_fix(
    case, tmp_path, released_sd, tiny_kit_run
):
    """One message on stderr (no traceback), exit code 2, nothing written."""
    if case == "truncated":
        source, layout = tmp_path / "released.ckpt", "official"
        torch.save(lightning_released_checkpoint(released_sd), source)
        source.write_bytes(source.read_bytes()[:20_000])
        expected = [f"{source}: the file is truncated or corrupt"]
    elif case == "not_a_checkpoint":
        source, layout = tmp_path / "notes.ckpt", "official"
        source.write_text("a text file, not a checkpoint\n")
        expected = [f"{source}: the file is truncated or corrupt, or not a PyTorch checkpoint"]
    else:
        source, layout = tiny_kit_run, "kit"
        expected = [f"cannot convert {source}", "head.enc.0.0.weight (8, 3, 3, 3) (expected (64, 3, 3, 3))"]
    out = tmp_path / "out" / "converted.ckpt"
    error = user_error(run_command("convert", str(source), "--from", layout, "--out", str(out)))
    for text in expected:
        assert text in error
    if case != "kit_network_the_release_cannot_run":  # that one lists the keys, one per kind
        assert len(error.splitlines()) == 1
    assert not out.parent.exists() or not list(out.parent.iterdir())


# ------------------------------------------------------------------------------------------------------------
# The converted checkpoint in the kit's tools
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory, released_sd) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    torch.save(lightning_released_checkpoint(released_sd), folder / "official.ckpt")
    out = folder / "kit.ckpt"
    assert (
        main([str(folder / "official.ckpt"), "--from", "official", "--out", str(out), "--input_size", "32"])
        == 0
    )
    return out


def _short_sampler_copy(path: Path, folder: Path) -> Path:
    """The converted checkpoint with a 2-step sampler, so CLI runs on CPU take seconds (weights unchanged)."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["sampler"]["init_args"]["num_steps"] = 2
    out = folder / "kit_2steps.ckpt"
    torch.save(ckpt, out)
    return out


def _no_key_warnings(records: list[warnings.WarningMessage], text: str) -> None:
    messages = [str(r.message) for r in records] + [text]
    bad = [
        m for m in messages if any(w in m.lower() for w in ("missing key", "unexpected key", "found keys"))
    ]
    assert not bad, bad


def test_converted_checkpoint_has_the_paper_recipe_and_loads_without_config(converted, released_sd):
    from dip_lightning.training.loading import load_module

    ckpt = torch.load(
        converted, weights_only=True
    )  # plain data: what LightningCLI's --ckpt_path parser needs
    sampler = ckpt["hyper_parameters"]["sampler"]
    assert sampler["class_path"] == "dip_lightning.core.diffusion.EulerSampler"
    assert sampler["init_args"] | {} == {
        "num_steps": 100,
        "cfg_scale": 2.9,
        "cfg_interval": [0.11, 0.97],
        "time_grid": "released",
        "time_shift": 1.0,
        "last_step": None,
    }
    assert ckpt["hyper_parameters"]["repa"] is None
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        module = load_module(converted)
    _no_key_warnings(records, "")
    # The sampler grid is the released one: linspace(0, 0.99, 100) then 1.0 in float32, no shift ...
    released_grid = torch.cat([torch.linspace(0.0, 1 - 1 / 100, 100), torch.tensor([1.0])])
    assert torch.equal(module.sampler.timesteps().float(), released_grid)
    # ... guided exactly where the released `t > 0.11 and t < 0.97` (float32 tensor vs scalar) guides
    assert [module.sampler.guided(t) for t in released_grid[:-1].tolist()] == [
        bool(t > 0.11 and t < 0.97) for t in released_grid[:-1]
    ]
    # and the weights are the EMA copy, the raw copy is current_model_state
    x, t, y = torch.randn(1, 3, 32, 32), torch.tensor([0.5]), torch.tensor([3])
    with torch.no_grad():
        torch.testing.assert_close(
            module.net(x, t, y), released_forward(released_sd, x, t, y, 2, 16), rtol=1e-4, atol=1e-5
        )
    raw = load_module(converted, weights="raw")
    assert torch.equal(raw.net.x_embedder.proj.bias, released_sd["s_embedder.proj.bias"] + 0.5)


def test_euler_sampler_of_the_converted_checkpoint_is_the_released_loop(converted):
    """The released EulerSampler._impl_sampling (float32 grid, [uncond; cond], interval CFG), 10 steps."""
    from dip_lightning.training.loading import load_module

    module = load_module(converted)
    sampler = module.make_sampler(num_steps=10)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 6])
    null = torch.full_like(y, 8)
    with torch.no_grad():
        ours = sampler.sample(module.net, noise, y, null_class=8)
        steps = torch.cat([torch.linspace(0.0, 1 - 1 / 10, 10), torch.tensor([1.0])])
        steps = steps / (steps + (1 - steps) * 1.0)
        x = noise
        for t_cur, t_next in zip(steps[:-1], steps[1:]):
            out = module.net(torch.cat([x, x]), t_cur.repeat(4), torch.cat([null, y]))
            w = 2.9 if (t_cur > 0.11 and t_cur < 0.97) else 1.0
            uncond, cond = out.chunk(2)
            x = x + (uncond + w * (cond - uncond)) * (t_next - t_cur)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_released_weights_convert_to_a_pretrained_folder_equal_to_the_converted_checkpoint(
    converted, released_sd, tmp_path
):
    """``convert --pretrained``: the folder loads (no pickle) to the converted checkpoint's module, bit for bit."""
    from dip_lightning.training.loading import load_module
    from dip_lightning.training.pretrained import load_pretrained

    source = tmp_path / "official.ckpt"
    torch.save(lightning_released_checkpoint(released_sd), source)
    out = tmp_path / "dip_pretrained"
    assert (
        main([str(source), "--from", "official", "--out", str(out), "--input_size", "32", "--pretrained"])
        == 0
    )
    folder, checkpoint = load_pretrained(out), load_module(converted)
    assert set(folder.net.state_dict()) == set(checkpoint.net.state_dict())
    for key, value in checkpoint.net.state_dict().items():
        assert torch.equal(folder.net.state_dict()[key], value), key
    assert folder.sampler == checkpoint.sampler  # the paper's Euler-100, CFG 2.9 on [0.11, 0.97]
    assert "ema_denoiser" in folder.loaded_weights
    card = (out / "README.md").read_text()
    assert "Converted from the released DiP weights" in card and "license: mit" in card


def test_sample_command_runs_on_the_converted_checkpoint(converted, tmp_path, capsys):
    from dip_lightning.commands.sample import main as sample_main

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rc = sample_main(
            ["--ckpt_path", str(converted), "--out", str(tmp_path / "s.npz"), "--num_samples", "2",
             "--batch_size", "2", "--num_steps", "2", "--device", "cpu"]
        )  # fmt: skip
    assert rc == 0
    _no_key_warnings(records, capsys.readouterr().out)
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["arr_0"].shape == (2, 32, 32, 3) and arrays["arr_0"].dtype == np.uint8


def test_predict_and_validate_through_the_cli(converted, tmp_path, demo_data, capsys):
    from dip_lightning.training.cli import cli_main

    ckpt = _short_sampler_copy(converted, tmp_path)
    trainer = [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.precision=32-true", "--trainer.callbacks=null", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        cli = cli_main(
            ["predict", "--config", str(XL_YAML), "--ckpt_path", str(ckpt), *trainer,
             "--data", "dip_lightning.core.data.LabelSeedDataModule", "--data.num_samples=2",
             "--data.num_classes=8", "--data.batch_size=2", "--data.image_size=32"]
        )  # fmt: skip
        assert cli.model.repa is None and cli.model.net.depth == 2  # built from the checkpoint's config
        cli = cli_main(
            ["validate", "--config", str(XL_YAML), "--ckpt_path", str(ckpt), *trainer,
             "--trainer.limit_val_batches=1",
             f"--data.init_args.train_shards={demo_data['train_shards']}",
             f"--data.init_args.val_shards={demo_data['val_shards']}",
             "--data.init_args.image_size=32", "--data.init_args.num_classes=8",
             "--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]
        )  # fmt: skip
    out = capsys.readouterr()
    _no_key_warnings(records, out.out + out.err)
    assert "val/flow_loss" in cli.trainer.callback_metrics


def _contains(big: object, small: object) -> bool:
    """Every key of ``small`` (nested) is in ``big`` with the same value."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _contains(big[k], v) for k, v in small.items())
    return big == small


def test_hyperparameters_are_the_xl_experiment_at_the_files_sizes():
    """What the converter stores is LightningCLI's parse of experiments/dip_xl16.yaml with REPA and compile off,
    at the network sizes read off the file: the DiP-XL/16 file gets the YAML's own network, another its sizes."""
    from jsonargparse import ArgumentParser

    from dip_lightning.training.module import DiPModule

    experiment = yaml.safe_load(XL_YAML.read_text())["model"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DiPModule, "model", fail_untyped=False)
    parsed = parser.parse_object({"model": experiment | {"repa": None, "compile": False}})
    expected = yaml.safe_load(parser.dump(parsed, skip_none=False))["model"]
    xl = kit_hyperparameters(infer_official_arch(meta_released_state_dict(**XL)))
    assert xl == expected | {"_instantiator": "lightning.pytorch.cli.instantiate_module"}
    assert xl["sampler"]["init_args"]["time_grid"] == "released"  # the kit's default, the released grid

    tiny = kit_hyperparameters(infer_official_arch(meta_released_state_dict(**TINY)), input_size=32)
    assert {k: tiny["net"]["init_args"][k] for k in TINY} == TINY and tiny["net"]["init_args"][
        "input_size"
    ] == 32
    sizes = (*TINY, "input_size")
    assert {k: v for k, v in tiny["net"]["init_args"].items() if k not in sizes} == {
        k: v for k, v in xl["net"]["init_args"].items() if k not in sizes
    }
    assert {k: v for k, v in tiny.items() if k != "net"} == {k: v for k, v in xl.items() if k != "net"}
    default = kit_hyperparameters(infer_official_arch(meta_released_state_dict(**{**TINY, "patch_size": 32})))
    assert default["net"]["init_args"]["input_size"] == 512  # the experiment's 16 patches per side


def test_load_pretrained_for_fine_tuning_loads_net_and_projector(converted, tmp_path, released_sd):
    from dip_lightning.core.repa import REPA
    from dip_lightning.training.module import DiPModule
    from dip_lightning.training.released import load_weights_into
    from tests.helpers.tiny_encoder import TinyViTEncoder

    repa = REPA(
        encoder=TinyViTEncoder(embed_dim=32, depth=1, num_heads=2, dit_patch_size=16, grid_size=2),
        projector_dim=64,
    )
    module = DiPModule(net=tiny_kit_model(), repa=repa)
    text = load_weights_into(module, converted)
    assert "REPA projector" in text
    assert torch.equal(module.net.x_embedder.proj.weight, released_sd["s_embedder.proj.weight"])
    official = lightning_released_checkpoint(released_sd)["state_dict"]
    assert torch.equal(module.repa.projector[4].weight, official["diffusion_trainer.proj.0.4.weight"])
    # the released file itself works too, and a wrong architecture is a clear error
    torch.save(lightning_released_checkpoint(released_sd), tmp_path / "official.ckpt")
    load_weights_into(module.net, tmp_path / "official.ckpt", weights="live")
    assert torch.equal(module.net.x_embedder.proj.bias, released_sd["s_embedder.proj.bias"] + 0.5)
    with pytest.raises(CheckpointMismatchError, match="blocks.2.adaLN_modulation.bias"):
        load_weights_into(tiny_kit_model(depth=3), converted)
