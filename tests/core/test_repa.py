"""REPA projector/loss/plumbing and the frozen encoders (dip_lightning.core.repa, dip_lightning.core.encoders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dip_lightning.core.encoders import DINOv2Encoder, DINOv2ViT, FeatureEncoder
from dip_lightning.core.repa import REPA
from tests.helpers.tiny_encoder import TinyViTEncoder

torch.set_num_threads(1)


def official_dinov2_vitb14_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of facebookresearch/dinov2 ``dinov2_vitb14_pretrain.pth``.

    vit_base: embed 768, depth 12, 12 heads, MLP 3072, patch 14, img_size 518 (37 x 37 grid + cls),
    layerscale, no registers, block_chunks=0 (keys ``blocks.{i}``), mask_token (1, 768).
    """
    d, hidden = 768, 3072
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + 37 * 37, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(12):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "ls1.gamma": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (hidden, d),
            p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (d, hidden),
            p + "mlp.fc2.bias": (d,),
            p + "ls2.gamma": (d,),
        }
    return shapes


# ------------------------------------------------------------------------------------------------ DINOv2
def test_dinov2_state_dict_matches_official_keys_and_shapes() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = DINOv2ViT.from_variant("vitb14")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_dinov2_vitb14_shapes()
    assert sum(v.numel() for v in model.parameters()) == 86_580_480  # ViT-B/14, 86.6M (incl. mask_token)


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory: pytest.TempPathFactory):
    """A ViT-B/14 state dict from a freshly built (seeded) model, saved like the official file."""
    model = DINOv2ViT.from_variant("vitb14").init_weights(torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitb14_pretrain.pth"
    state = model.state_dict()
    torch.save(state, path)
    yield path, state
    path.unlink()  # ~350 MB: do not leave it behind


def test_dinov2_encoder_loads_file_and_gives_dit_grid_features(dinov2_file: tuple[Path, dict]) -> None:
    path, state = dinov2_file
    encoder = DINOv2Encoder(weights_path=str(path))
    loaded = encoder.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert encoder.embed_dim == 768 and isinstance(encoder, FeatureEncoder)

    x = torch.rand(1, 3, 256, 256) * 2 - 1
    pre = encoder.preprocess(x)
    assert pre.shape == (1, 3, 224, 224)  # 14 * 256 / 16
    with torch.no_grad():
        feats = encoder(x)
    assert feats.shape == (1, 256, 768) and torch.isfinite(feats).all()
    # x_norm_patchtokens: the final LayerNorm (weight 1, bias 0 here) leaves every token zero-mean.
    torch.testing.assert_close(feats.mean(-1), torch.zeros(1, 256), atol=1e-4, rtol=0)


def test_dinov2_pos_embed_interpolation() -> None:
    model = DINOv2ViT(embed_dim=16, depth=1, num_heads=2, patch_size=14, img_size=518)
    model.init_weights(torch.Generator().manual_seed(1))
    assert model.interpolate_pos_encoding(37, 37) is model.pos_embed  # native grid: unchanged
    pos = model.interpolate_pos_encoding(16, 16)
    assert pos.shape == (1, 1 + 256, 16)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # the cls position is never interpolated
    # Bicubic with the official (grid + 0.1) / 37 scale factor.
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 16).permute(0, 3, 1, 2)
    ref = nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    torch.testing.assert_close(pos[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 16))


def test_missing_dinov2_weights_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(FileNotFoundError) as info:
        DINOv2Encoder(weights_path=str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "dinov2_vitb14_pretrain.pth" in message and "facebookresearch/dinov2" in message
    assert "weights_path" in message


def test_dinov2_wrong_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(RuntimeError, match="does not match the DINOv2 vitb14"):
        DINOv2Encoder(weights_path=str(path))


# ------------------------------------------------------------------------------------------------ TinyViT
def test_tiny_vit_encoder_contract() -> None:
    enc = TinyViTEncoder(embed_dim=32, depth=2, num_heads=4, dit_patch_size=8, grid_size=4, seed=3)
    assert isinstance(enc, FeatureEncoder) and enc.embed_dim == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 16, 32)  # (32 / 8)^2 tokens = the DiT grid
        assert enc(torch.rand(1, 3, 48, 64) * 2 - 1).shape == (
            1,
            6 * 8,
            32,
        )  # other sizes: pos grid interpolated
        same = TinyViTEncoder(embed_dim=32, depth=2, num_heads=4, dit_patch_size=8, grid_size=4, seed=3)(x)
        other = TinyViTEncoder(embed_dim=32, depth=2, num_heads=4, dit_patch_size=8, grid_size=4, seed=4)(x)
    assert torch.equal(out, same)
    assert not torch.allclose(out, other)
    assert out[0].std(dim=0).mean() > 0.1  # tokens differ from each other (features depend on the content)
    with pytest.raises(ValueError, match="divisible"):
        enc(torch.zeros(1, 3, 30, 30))


# ------------------------------------------------------------------------------------------------ REPA
def small_repa(**kwargs) -> REPA:
    enc = TinyViTEncoder(embed_dim=16, depth=1, num_heads=2, dit_patch_size=8, grid_size=4, seed=0)
    return REPA(encoder=enc, **{"hidden_size": 24, "projector_dim": 32, "block": 2, **kwargs})


def identity_projector(repa: REPA) -> None:
    """Set the 3-layer SiLU MLP to the exact identity, using silu(z) - silu(-z) = z (needs H = 2D, D = E)."""
    d = repa.hidden_size
    eye = torch.eye(d)
    lin1, lin2, lin3 = repa.projector[0], repa.projector[2], repa.projector[4]
    with torch.no_grad():
        lin1.weight.copy_(torch.cat([eye, -eye]))
        lin2.weight.copy_(torch.cat([torch.cat([eye, -eye], 1), torch.cat([-eye, eye], 1)]))
        lin3.weight.copy_(torch.cat([eye, -eye], 1))
        for lin in (lin1, lin2, lin3):
            lin.bias.zero_()


def test_repa_loss_zero_when_projection_equals_target() -> None:
    repa = small_repa(hidden_size=16, projector_dim=32)
    identity_projector(repa)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    target = repa.target_features(images)
    torch.testing.assert_close(repa.project(target), target, atol=1e-5, rtol=1e-5)
    assert repa.loss(target, images).item() == pytest.approx(0.0, abs=1e-6)
    assert repa.loss(3.0 * target, images).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    assert repa.loss(-target, images).item() == pytest.approx(2.0, abs=1e-5)  # opposite: the maximum


def test_repa_loss_range_and_gradients() -> None:
    repa = small_repa()
    repa.train()
    assert not repa.encoder.training  # frozen encoder stays in eval mode
    hidden = torch.randn(3, 16, 24, requires_grad=True)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    loss = repa.loss(hidden, images)
    assert loss.ndim == 0 and 0.0 <= loss.item() <= 2.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0  # flows back into the DiT
    for p in repa.projector.parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    for p in repa.encoder.parameters():
        assert not p.requires_grad and p.grad is None
    trainable = {n for n, p in repa.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)


def test_repa_token_mismatch_is_an_error() -> None:
    repa = small_repa()
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # 16 encoder tokens
    with pytest.raises(ValueError, match="token mismatch"):
        repa.loss(torch.randn(2, 15, 24), images)
    repa.bind(hidden_size=24, num_tokens=16)
    with pytest.raises(ValueError, match="expected 16 DiT tokens"):
        repa.loss(torch.randn(2, 64, 24), images)


def test_repa_bind_builds_projector_once() -> None:
    repa = small_repa(hidden_size=None)
    assert repa.projector is None
    with pytest.raises(RuntimeError, match="bind"):
        repa.project(torch.randn(1, 16, 24))
    repa.bind(hidden_size=24, num_tokens=16, depth=4)
    first = repa.projector
    dims = [(m.in_features, m.out_features) for m in first if isinstance(m, nn.Linear)]
    assert dims == [(24, 32), (32, 32), (32, 16)]
    assert repa.bind(hidden_size=24).projector is first
    with pytest.raises(ValueError):
        repa.bind(hidden_size=48)
    with pytest.raises(ValueError):
        small_repa(block=9).bind(hidden_size=24, depth=8)


def test_repa_state_dict_excludes_encoder_and_loads_strictly() -> None:
    parent = nn.Module()
    parent.repa = small_repa()
    keys = set(parent.state_dict())
    assert keys == {f"repa.projector.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    other = nn.Module()
    other.repa = small_repa()
    other.load_state_dict(parent.state_dict(), strict=True)
    for k, v in parent.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    enc_before = {k: v.clone() for k, v in other.repa.encoder.state_dict().items()}
    full = {**parent.state_dict(), **{f"repa.encoder.{k}": v for k, v in enc_before.items()}}
    other.load_state_dict(full, strict=True)  # an old checkpoint with the encoder still loads


def test_repa_built_from_yaml_by_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(REPA, "repa")
    cfg = parser.parse_string(
        "repa:\n"
        "  encoder:\n"
        "    class_path: tests.helpers.tiny_encoder.TinyViTEncoder\n"
        "    init_args: {embed_dim: 16, depth: 1, num_heads: 2, dit_patch_size: 8, grid_size: 4}\n"
        "  block: 2\n"
        "  projector_dim: 32\n"
    )
    repa = parser.instantiate(cfg).repa
    assert isinstance(repa.encoder, TinyViTEncoder) and repa.block == 2 and repa.projector is None
    repa.bind(hidden_size=24, num_tokens=16)
    assert repa.loss(torch.randn(1, 16, 24), torch.zeros(1, 3, 32, 32)).ndim == 0
