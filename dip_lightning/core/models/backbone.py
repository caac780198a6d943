"""DiT backbone pieces of DiP: RMSNorm, 2D RoPE, attention, SwiGLU, adaLN blocks, embedders, patchify.

Everything here follows the released DiP code (docs/paper.md §1.2), which is PixNerd's `FlattenDiTBlock`
stack: pre-norm RMSNorm, adaLN modulation without a SiLU inside the block (the conditioning vector arrives
already SiLU-ed), gated residuals, QK-RMSNorm, 2D RoPE and no absolute position embedding (a fixed sin-cos
one, :func:`sincos_pos_embed_2d`, is DiP's named option ``pos_embed``, off by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dip_lightning.core.errors import ConfigError

# ----------------------------------------------------------------------------------------------------
# Patchify / unpatchify
# ----------------------------------------------------------------------------------------------------


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*P*P), tokens row-major over the patch grid, features ordered (C, kh, kw).

    This is the layout of `F.unfold(x, P, stride=P).transpose(1, 2)` used by the released code, written as a
    reshape because that is cheaper than unfold and keeps the result contiguous.
    """
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, C*P*P) or (B*N, C, P, P) -> (B, C, H, W)."""
    p = patch_size
    gh, gw = height // p, width // p
    x = patches.reshape(-1, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, channels, height, width)


# ----------------------------------------------------------------------------------------------------
# Normalisation and modulation
# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (as released) and scaled by a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation `x * (1 + scale) + shift`; shift/scale broadcast over the token dim."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------
# 2D rotary position embedding
# ----------------------------------------------------------------------------------------------------


def rope_2d_from_positions(
    pos_x: Tensor, pos_y: Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """cos/sin tables (N, head_dim/2) for tokens at continuous 2D positions (pos_x[i], pos_y[i]).

    head_dim/4 frequencies `theta ** (-4k / head_dim)`; the head_dim/2 rotation pairs alternate x, y, x, y,
    ... (pair 2k rotates by pos_x * f_k, pair 2k+1 by pos_y * f_k), exactly the interleaving of the released
    code. Computed in float32 on the fly: it is tiny, keeps the model resolution-agnostic and meta-device
    friendly.
    """
    if head_dim % 4:
        raise ConfigError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    k = torch.arange(0, head_dim, 4, device=pos_x.device, dtype=torch.float32)
    freqs = theta ** (-k / head_dim)  # (head_dim/4,)
    ax = pos_x.float()[:, None] * freqs  # (N, head_dim/4)
    ay = pos_y.float()[:, None] * freqs
    angles = torch.stack([ax, ay], dim=-1).flatten(1)  # (N, head_dim/2): x0, y0, x1, y1, ...
    return angles.cos(), angles.sin()


def rope_2d_grid(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    theta: float = 10000.0,
    scale: float | None = 16.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """cos/sin tables for a row-major grid_h x grid_w token grid.

    `scale=16.0` places positions at `linspace(0, 16, grid)` on each axis, as released (for a 16x16 grid the
    step is 16/15, and any resolution spans the same range, i.e. positions are resolution-normalised).
    `scale=None` is the named alternative: integer positions 0..grid-1 (plain ViT/EVA-style RoPE).
    """
    if scale is None:
        ys = torch.arange(grid_h, device=device, dtype=torch.float32)
        xs = torch.arange(grid_w, device=device, dtype=torch.float32)
    else:
        ys = torch.linspace(0, scale, grid_h, device=device)
        xs = torch.linspace(0, scale, grid_w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return rope_2d_from_positions(xx.reshape(-1), yy.reshape(-1), head_dim, theta)


def sincos_pos_embed_2d(
    grid_h: int, grid_w: int, dim: int, device: torch.device | str | None = None
) -> Tensor:
    """Fixed 2D sin-cos absolute position embedding (N, dim) for a row-major grid_h x grid_w token grid.

    DiT's / MAE's table: half of the channels encode the row, half the column, each as [sin, cos] of the integer
    position times ``10000 ** (-k / (dim / 4))``. Not in the released DiP (RoPE only); DiP's ``pos_embed``
    option adds it to the tokens (docs/paper.md, deviations).
    """
    if dim % 4:
        raise ConfigError(f"the 2D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    ys = torch.arange(grid_h, device=device, dtype=torch.float32)
    xs = torch.arange(grid_w, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    ay = yy.reshape(-1, 1) * omega  # (N, dim/4)
    ax = xx.reshape(-1, 1) * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (2j, 2j+1) of x (..., N, head_dim) by the angles of cos/sin (N, head_dim/2)."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention, MLP, block
# ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, per-head QK-RMSNorm, 2D RoPE, SDPA, biased out proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width `int(2/3 * mlp_ratio * dim)` (3072 for D=1152, ratio 4), not rounded further."""
    return int(2 * int(dim * mlp_ratio) / 3)


class SwiGLU(nn.Module):
    """`w2(silu(w1 x) * w3 x)` without biases; keeps the parameter count of a ratio-`mlp_ratio` GELU MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DiTBlock(nn.Module):
    """Pre-norm DiT block with adaLN modulation and gated residuals.

    `adaLN_modulation` is one Linear(D, 6D) applied directly to the conditioning vector c, which the model has
    already passed through SiLU, hence no SiLU here (unlike DiT, whose adaLN MLP starts with SiLU).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


# ----------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of t with dim/2 frequencies spaced geometrically in [1/max_period, 1].

    `max_period=10` (not DiT's 10000) because t lives in [0, 1], as in the released code.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (256) -> Linear -> SiLU -> Linear; weights N(0, 0.02), biases PyTorch default."""

    def __init__(self, dim: int, frequency_size: int = 256, max_period: float = 10.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """Embedding table with num_classes + 1 rows; row `num_classes` is the null (unconditional) class for CFG.

    Label dropout is the training loop's job (it swaps labels for the null index), so the embedder is a pure
    lookup and sampling code can ask for the null class explicitly.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Linear(C*P*P -> D) on patchified pixels (a stride-P conv as a matmul); xavier-uniform, zero bias."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, patches: Tensor) -> Tensor:
        """patches: (B, N, C*P*P) from :func:`patchify` -> (B, N, D)."""
        return self.proj(patches)
