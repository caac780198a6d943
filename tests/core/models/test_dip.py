"""Behaviour of the DiP model family at tiny sizes: shapes, locality, RoPE, conditioning, init, training."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dip_lightning.core.diffusion import guided_velocity
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models import AttentionHead, CoordMLPHead, DiP, LinearHead, MLPHead, PatchDetailerHead
from dip_lightning.core.models.backbone import (
    Attention,
    DiTBlock,
    apply_rope,
    patchify,
    rope_2d_from_positions,
    rope_2d_grid,
    sincos_pos_embed_2d,
    unpatchify,
)

torch.set_num_threads(1)

NUM_CLASSES = 10
SMALL_PDH = functools.partial(PatchDetailerHead, base_channels=8)
PER_PATCH_HEADS = {
    "pdh": SMALL_PDH,
    "mlp": functools.partial(MLPHead, hidden_dim=32),
    "coord": functools.partial(CoordMLPHead, width=16, depth=2, num_freqs=4),
    "attention": functools.partial(AttentionHead, width=16, depth=1, num_heads=2),
}
ALL_HEADS = {**PER_PATCH_HEADS, "linear": LinearHead}


def tiny(**kwargs) -> DiP:
    cfg = {
        "input_size": 32,
        "patch_size": 16,
        "hidden_size": 64,
        "depth": 3,
        "num_heads": 4,
        "num_classes": NUM_CLASSES,
        "head": SMALL_PDH,
    }
    cfg.update(kwargs)
    return DiP(**cfg)


def inputs(batch: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------------
# Shapes and layout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("patch_size", "size"), [(16, 32), (16, 48), (32, 64)])
def test_output_shape_equals_input_shape(patch_size, size):
    torch.manual_seed(0)
    model = tiny(patch_size=patch_size, input_size=size)
    x, t, y = inputs(size=size)
    v = model(x, t, y)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()


def test_non_square_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 64)
    assert tiny()(x, torch.rand(2), torch.zeros(2, dtype=torch.long)).shape == x.shape


def test_patchify_matches_unfold_and_roundtrips():
    x = torch.randn(2, 3, 32, 48)
    tokens = patchify(x, 16)
    assert torch.equal(tokens, F.unfold(x, 16, stride=16).transpose(1, 2))
    assert torch.equal(unpatchify(tokens, 16, 3, 32, 48), x)
    assert torch.equal(unpatchify(tokens.reshape(-1, 3, 16, 16), 16, 3, 32, 48), x)


def test_patch_embedding_is_a_stride_p_conv():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    lin = model.x_embedder.proj
    conv = F.conv2d(x, lin.weight.view(64, 3, 16, 16), lin.bias, stride=16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.x_embedder(patchify(x, 16)), conv, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PER_PATCH_HEADS))
@pytest.mark.parametrize("patch_size", [16, 32])
def test_head_output_of_a_patch_depends_only_on_that_patch(name, patch_size):
    torch.manual_seed(0)
    head = PER_PATCH_HEADS[name](64, patch_size, 3).eval()
    patches = torch.randn(6, 3, patch_size, patch_size)
    tokens = torch.randn(6, 64)
    cond = torch.randn(2, 64)
    out = head(patches, tokens, cond)
    assert out.shape == patches.shape
    perturbed = patches.clone()
    perturbed[4] += torch.randn_like(perturbed[4])
    diff = (head(perturbed, tokens, cond) - out).flatten(1).abs().amax(1)
    assert diff[4] > 1e-4
    assert torch.all(diff[torch.arange(6) != 4] == 0)


@pytest.mark.parametrize("patch_size", [16, 32])
def test_patch_detailer_token_reaches_every_pixel(patch_size):
    # At P=32 the 2x2 bottleneck tiles the token; every output pixel must still see it. float64 because at the
    # official (PyTorch default) init the token's effect on the output is ~1e-7.
    torch.manual_seed(0)
    head = SMALL_PDH(64, patch_size, 3).double()
    patches = torch.randn(3, 3, patch_size, patch_size, dtype=torch.float64)
    tokens, cond = torch.randn(3, 64, dtype=torch.float64), torch.randn(1, 64, dtype=torch.float64)
    out = head(patches, tokens, cond)
    tokens2 = tokens.clone()
    tokens2[1] += 1.0
    changed = (head(patches, tokens2, cond) - out).abs()
    assert torch.all(changed[1] > 0)
    assert torch.all(changed[[0, 2]] == 0)


def token_and_pixel_effect(head: PatchDetailerHead, patch_size: int = 16) -> tuple[float, float]:
    """Output change when the tokens are redrawn, and when the noisy pixels are redrawn (std over everything)."""
    g = torch.Generator().manual_seed(1)
    draw = functools.partial(torch.randn, generator=g)
    patches, tokens, cond = (
        draw(64, 3, patch_size, patch_size),
        draw(64, head.hidden_size),
        draw(64, head.hidden_size),
    )
    with torch.no_grad():
        out = head(patches, tokens, cond)
        token = (head(patches, draw(64, head.hidden_size), cond) - out).std().item()
        pixel = (head(draw(64, 3, patch_size, patch_size), tokens, cond) - out).std().item()
    return token, pixel


def test_patch_detailer_kaiming_init_lets_the_token_through():
    # Released (PyTorch default) init: the token crosses 2 * depth + 1 shrinking layers, the pixels arrive through
    # the skips, so the head hardly hears the backbone at the start. He-normal weights give the token a say.
    torch.manual_seed(0)
    released = PatchDetailerHead(192, 16, 3, depth=3, base_channels=16)
    torch.manual_seed(0)
    kaiming = PatchDetailerHead(192, 16, 3, depth=3, base_channels=16, init="kaiming")
    assert released.init == "released"
    token, pixel = token_and_pixel_effect(released)
    assert token < 1e-2 * pixel
    token, pixel = token_and_pixel_effect(kaiming)
    assert token > 5e-2 * pixel
    # Same tensors, and the output conv is left to the model's init (adaLN-zero zeroes it).
    assert [n for n, _ in released.named_parameters()] == [n for n, _ in kaiming.named_parameters()]
    torch.testing.assert_close(kaiming.out.weight, released.out.weight)
    assert all(m.bias.abs().sum() == 0 for m in kaiming.enc.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ConfigError, match="init"):
        PatchDetailerHead(192, 16, 3, init="xavier")


def test_patch_detailer_layer_shapes_follow_paper_table():
    head = PatchDetailerHead(1152, 16, 3)
    assert head.widths == [64, 128, 256, 512]
    assert [m[0].out_channels for m in head.enc] == [64, 128, 256, 512]
    assert head.bottleneck[0].in_channels == 512 + 1152 and head.bottleneck[0].kernel_size == (1, 1)
    assert [m.in_channels for m in head.up] == [64, 128, 256, 512]
    assert [(m[0].in_channels, m[0].out_channels) for m in head.dec] == [
        (128, 64),
        (256, 64),
        (512, 128),
        (1024, 256),
    ]
    assert isinstance(head.pool, torch.nn.MaxPool2d)
    assert head.out.kernel_size == (1, 1) and head.out.out_channels == 3
    with pytest.raises(ValueError, match="divisible"):
        PatchDetailerHead(64, 16, 3, depth=5)
    assert PatchDetailerHead(64, 32, 3, depth=5, base_channels=8, max_channels=32).widths == [
        8,
        16,
        32,
        32,
        32,
    ]


def test_channels_last_is_numerically_the_same():
    # unet() runs either layout; forward() uses the head's `channels_last` setting (True by default).
    torch.manual_seed(0)
    head = SMALL_PDH(64, 16, 3)
    patches, tokens = torch.randn(4, 3, 16, 16), torch.randn(4, 64)
    ref = head.unet(patches, tokens, channels_last=False)
    out = head.unet(patches, tokens, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(patches, tokens, None), out, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, n = 16, 12
    q, k = torch.randn(n, head_dim), torch.randn(n, head_dim)
    px, py = torch.rand(n) * 16, torch.rand(n) * 16

    def scores(dx: float, dy: float) -> torch.Tensor:
        cos, sin = rope_2d_from_positions(px + dx, py + dy, head_dim)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T

    base = scores(0.0, 0.0)
    torch.testing.assert_close(scores(3.7, -2.0), base, rtol=1e-4, atol=1e-4)
    # ... but not invariant to moving a single token, and rotation preserves norms.
    cos, sin = rope_2d_from_positions(px, py, head_dim)
    moved_x = px.clone()
    moved_x[0] += 1.0
    cos2, sin2 = rope_2d_from_positions(moved_x, py, head_dim)
    assert not torch.allclose(apply_rope(q, cos2, sin2) @ apply_rope(k, cos2, sin2).T, base, atol=1e-3)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_rope_attention_is_translation_invariant():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4)
    x = torch.randn(2, 9, 64)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    out = attn(x, rope_2d_from_positions(xs.flatten(), ys.flatten(), 16))
    shifted = attn(x, rope_2d_from_positions(xs.flatten() + 5, ys.flatten() - 2, 16))
    torch.testing.assert_close(shifted, out, rtol=1e-4, atol=1e-5)


def test_rope_grid_layout_matches_release():
    # Pairs alternate x, y; positions are linspace(0, 16, grid); frequency k is 10000 ** (-4k / head_dim).
    cos, sin = rope_2d_grid(16, 16, 72)
    assert cos.shape == (256, 36)
    angle = torch.atan2(sin, cos)
    step = 16 / 15
    assert angle[1, 0].item() == pytest.approx(step, abs=1e-5)  # token (row 0, col 1): x pair
    assert angle[1, 1].item() == pytest.approx(0.0, abs=1e-6)  # its y pair
    assert angle[16, 1].item() == pytest.approx(step, abs=1e-5)  # token (row 1, col 0): y pair
    assert angle[1, 2].item() == pytest.approx(step * 10000 ** (-4 / 72), abs=1e-5)
    cos_i, sin_i = rope_2d_grid(4, 4, 72, scale=None)
    assert torch.atan2(sin_i, cos_i)[1, 0].item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# Conditioning and block outputs
# ----------------------------------------------------------------------------------------------------


def test_sincos_pos_embed_table_layout():
    # Channels: [sin(row w), cos(row w), sin(col w), cos(col w)], w_k = 10000 ** (-k / (dim / 4)); integer positions.
    table = sincos_pos_embed_2d(3, 4, 16)
    assert table.shape == (12, 16)
    row, col = 2, 3
    token = table[row * 4 + col]
    w = 10000 ** (-torch.arange(4.0) / 4)
    torch.testing.assert_close(
        token, torch.cat([(row * w).sin(), (row * w).cos(), (col * w).sin(), (col * w).cos()])
    )
    assert len({tuple(r.tolist()) for r in table}) == 12  # every position distinct
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 18)


def test_pos_embed_option_tells_tokens_apart_and_defaults_to_released():
    # RoPE alone (the release): attention sees only relative offsets, so identical patches everywhere give identical
    # outputs in every patch; the sin-cos embedding gives each position its own output. Same parameters either way.
    torch.manual_seed(0)
    released = tiny(input_size=64, init="official", head=LinearHead)  # the token alone makes the patch
    assert released.pos_embed == "none"
    torch.manual_seed(0)
    absolute = tiny(input_size=64, init="official", head=LinearHead, pos_embed="sincos")
    assert [n for n, _ in released.named_parameters()] == [n for n, _ in absolute.named_parameters()]
    patch = torch.randn(1, 3, 16, 16)
    x = patch.repeat(1, 1, 4, 4)  # a 4x4 grid of the same patch
    t, y = torch.tensor([0.3]), torch.tensor([1])
    with torch.no_grad():
        out_rel = patchify(released(x, t, y), 16)[0]
        out_abs = patchify(absolute(x, t, y), 16)[0]
    torch.testing.assert_close(out_rel, out_rel[:1].expand_as(out_rel), rtol=1e-4, atol=1e-5)
    apart = (out_abs[:, None] - out_abs[None]).abs().amax(dim=-1) + torch.eye(16)  # (16, 16), diagonal masked
    assert apart.min() > 1e-2 * out_abs.abs().max()  # no two positions alike
    with pytest.raises(ConfigError, match="pos_embed"):
        tiny(pos_embed="learned")


def test_null_class_is_a_separate_label():
    torch.manual_seed(0)
    model = tiny().double()
    assert model.null_class == NUM_CLASSES == model.y_embedder.embedding_table.num_embeddings - 1
    x, t, _ = inputs()
    x, t = x.double(), t.double()
    v_null, h_null = model(x, t, torch.full((2,), model.null_class), return_block=model.depth)
    v_real, h_real = model(x, t, torch.zeros(2, dtype=torch.long), return_block=model.depth)
    assert torch.isfinite(v_null).all()
    # The label moves the backbone tokens by ~2%; the official (PyTorch default) init of the conv head
    # attenuates the token pathway so much that the output moves by only ~1e-7 relative at init: float64.
    assert (h_null - h_real).abs().amax() > 1e-3 * h_real.abs().mean()
    assert (v_null - v_real).abs().amax() > 1e-12
    with pytest.raises(IndexError):
        model(x, t, torch.full((2,), NUM_CLASSES + 1))


def test_guidance_of_the_model_in_one_doubled_batch():
    torch.manual_seed(0)
    model = tiny()
    x, t, y = inputs()
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
    for scale in (0.0, 1.0, 2.9):
        guided = guided_velocity(model, x, t, y, model.null_class, scale)
        torch.testing.assert_close(guided, v_u + scale * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_scalar_time_broadcasts():
    torch.manual_seed(0)
    model = tiny()
    x, _, y = inputs()
    torch.testing.assert_close(model(x, torch.tensor(0.3), y), model(x, torch.full((2,), 0.3), y))


@pytest.mark.parametrize("placement", ["post_hoc", "hybrid"])
def test_return_block_returns_that_blocks_tokens(placement):
    torch.manual_seed(0)
    model = tiny(depth=4, placement=placement, intermediate_block=2, intermediate_head=SMALL_PDH)
    captured = {}
    model.blocks[1].register_forward_hook(lambda mod, args, out: captured.setdefault("h", out))
    x, t, y = inputs()
    v, hidden = model(x, t, y, return_block=2)
    assert hidden.shape == (2, 4, 64)
    assert torch.equal(hidden, captured["h"])
    torch.testing.assert_close(v, model(x, t, y))
    with pytest.raises(ValueError):
        model(x, t, y, return_block=5)


def test_time_and_label_reach_the_output():
    torch.manual_seed(0)
    model = tiny().double()
    x, t, y = inputs()
    x, t = x.double(), t.double()
    v = model(x, t, y)
    assert (model(x, 1 - t, y) - v).abs().amax() > 1e-12
    assert (model(x, t, (y + 1) % NUM_CLASSES) - v).abs().amax() > 1e-12


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    model = tiny()
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x, t, y)
    assert v.shape == x.shape and torch.isfinite(v).all()


# ----------------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------------


def test_adaln_zero_blocks_start_as_identity_and_output_zero():
    torch.manual_seed(0)
    model = tiny(init="adaln_zero", placement="hybrid", intermediate_head=SMALL_PDH)
    x, t, y = inputs()
    h = torch.randn(2, 4, 64)
    cond = torch.randn(2, 64)
    rope = rope_2d_grid(2, 2, 16)
    for block in model.blocks:
        assert isinstance(block, DiTBlock)
        assert torch.equal(block(h, cond, rope), h)
    assert torch.count_nonzero(model.inject.weight) == 0
    assert torch.count_nonzero(model.intermediate_head.out.weight) > 0  # so the injection can learn
    assert torch.count_nonzero(model(x, t, y)) == 0
    dit = tiny(init="adaln_zero", head=LinearHead)
    assert torch.count_nonzero(dit.head.adaLN_modulation.weight) == 0
    assert torch.count_nonzero(dit(x, t, y)) == 0


def test_official_init_is_not_zero_and_embedders_are_initialised():
    torch.manual_seed(0)
    model = tiny(hidden_size=256, num_classes=1000)
    assert all(torch.count_nonzero(b.adaLN_modulation.weight) > 0 for b in model.blocks)
    assert torch.count_nonzero(model.head.out.weight) > 0
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    x, t, y = inputs()
    assert model(x, t, y).abs().mean() > 0


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def one_training_step(model: DiP, size: int = 32) -> float:
    x, _, y = inputs(size=size)
    noise = torch.randn_like(x)
    t = torch.sigmoid(torch.randn(x.shape[0]))
    xt = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.mse_loss(model(xt, t, y), x - noise)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert no_grad == []
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []
    return loss.item()


@pytest.mark.parametrize("name", list(ALL_HEADS))
def test_every_head_trains_one_step(name):
    torch.manual_seed(0)
    loss = one_training_step(tiny(head=ALL_HEADS[name]))
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("placement", ["post_hoc", "intermediate", "hybrid"])
@pytest.mark.parametrize("patch_size", [16, 32])
def test_every_placement_trains_one_step(placement, patch_size):
    torch.manual_seed(0)
    size = 2 * patch_size
    head = None if placement == "intermediate" else SMALL_PDH  # None: the placement's default final head
    model = tiny(
        placement=placement, patch_size=patch_size, input_size=size, head=head, intermediate_head=SMALL_PDH
    )
    if placement == "intermediate":
        assert isinstance(model.head, LinearHead) and model.intermediate_block == 1
    else:
        assert isinstance(model.head, PatchDetailerHead)
    loss = one_training_step(model, size=size)
    assert torch.isfinite(torch.tensor(loss))


def test_placement_validation():
    with pytest.raises(ValueError, match="intermediate_block"):
        tiny(placement="intermediate", intermediate_block=3)
    with pytest.raises(ValueError, match="placement"):
        tiny(placement="middle")


def _saved_activation_bytes(model: DiP, *inputs) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters excluded."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor):  # noqa: ANN001, ANN202
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return total


def test_activation_checkpointing_same_gradients_less_memory():
    x, t, y = inputs()
    plain = tiny().double()
    ckpt = tiny(checkpoint_blocks=3, checkpoint_head=True).double()
    ckpt.load_state_dict(plain.state_dict())
    args = (x.double(), t.double(), y)
    plain(*args).square().mean().backward()
    ckpt(*args).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-15, msg=name)
    full, blocks_only = (
        _saved_activation_bytes(plain, *args),
        _saved_activation_bytes(tiny(checkpoint_blocks=3).double(), *args),
    )
    assert _saved_activation_bytes(ckpt, *args) < blocks_only < full
    ckpt.eval()  # no recomputation outside training: nothing to save anyway, and no checkpoint overhead
    with torch.no_grad():
        torch.testing.assert_close(ckpt(*args), plain.eval()(*args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        tiny(checkpoint_blocks=4)
