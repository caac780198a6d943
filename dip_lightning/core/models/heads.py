"""Output heads that turn backbone tokens (and the noisy pixels) into per-patch predictions.

Head call signature (every head, so DiP can treat them alike)::

    head(patches, tokens, cond) -> out
    patches: (B*N, C, P, P)  raw noisy pixels x_t of each patch (what the Patch Detailer Head refines)
    tokens:  (B*N, D)        one backbone token per patch; which one (s = silu(t_emb + h) or the raw h) is
                             chosen by the head's `token_input` attribute, read by DiP
    cond:    (B, D)          the conditioning vector c = silu(t_emb + y_emb) of each image (N = B*N / B)
    out:     (B*N, C, P, P)  per-patch prediction (the flow velocity for DiP)

Patches are flattened into the batch because every DiP-style head treats patches independently; only
`LinearHead` (DiT's FinalLayer) looks at `cond`. Constructors all start with `(hidden_size, patch_size,
in_channels)` so that a head can be injected from YAML as a `Callable[[int, int, int], PatchHead]` (class_path
+ init_args), the same mechanism Lightning uses for OptimizerCallable.

Sizes the paper does not give (MLP, coordinate-MLP and attention heads, docs/paper.md §1.5) are chosen here and
documented per class, aiming at the paper's Table 2 totals where that is cheap.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models.backbone import RMSNorm, modulate
from dip_lightning.core.models.dense_conv import conv3x3_taps, dense_conv3x3

TokenInput = Literal["silu_temb", "raw"]
HeadInit = Literal["released", "kaiming"]
MAX_DENSE_CONV_SIDE = 4  # PatchDetailerHead(dense_conv_side=...): beyond 4x4 maps the dense form only loses


class PatchHead(nn.Module):
    """Base class of all heads: stores the geometry and which backbone token the head wants.

    token_input:
        "silu_temb": s = silu(t_emb + h_last), what the released DiP hands its head (docs/paper.md §1.2).
        "raw": the last block's tokens h_last unchanged, what DiT's FinalLayer receives.
    Subclasses name their last layer `out`; :meth:`zero_init_output_` zeroes it for the `adaln_zero` init.
    """

    def __init__(
        self, hidden_size: int, patch_size: int, in_channels: int, token_input: TokenInput = "silu_temb"
    ) -> None:
        super().__init__()
        if token_input not in ("silu_temb", "raw"):
            raise ConfigError(f"token_input must be 'silu_temb' or 'raw', got {token_input!r}")
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.token_input = token_input

    def forward(self, patches: Tensor, tokens: Tensor, cond: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def zero_init_output_(self) -> None:
        """Zero the output layer so the head predicts 0 at init (DiT's adaLN-Zero convention)."""
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)


def _conv3x3_silu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.SiLU())


class PatchDetailerHead(PatchHead):
    """DiP's Patch Detailer Head: a per-patch conv U-Net with the backbone token injected at the bottleneck.

    Layer table of docs/paper.md §1.3 (defaults depth=4, base_channels=64 give exactly 6,968,067 parameters at
    D=1152, independent of P): per stage Conv3x3+SiLU then MaxPool2d(2), channels 3->64->128->256->512;
    bottleneck concat[pooled, token] -> Conv1x1(512+D -> 512)+SiLU; up path ConvTranspose2d(k2, s2, channels
    kept), concat the skip, Conv3x3+SiLU down to the next stage's width (64 at the top); output Conv1x1(64 ->
    C), no activation and no residual.

    depth: number of down/up stages; the bottleneck is P / 2**depth pixels wide, so P must be divisible by
        2**depth. With P=32 and depth 4 the bottleneck is 2x2 and the token is tiled over it, as the released
        code does.
    base_channels: width of the first stage; stage i has min(base_channels * 2**i, max_channels) channels.
    max_channels: cap on the doubling (512 by default, the paper's deepest width), so that deeper heads
        (paper Fig 10a) do not grow quadratically in parameters; it does not bind at the defaults.
    channels_last: run the convolutions in NHWC (numerically the same function): much cheaper for this head on
        GPU and faster on CPU too (BENCHMARKS.md).
    dense_conv_side: 3x3 convolutions on maps of side <= this many pixels run as one dense matrix multiply
        (:mod:`dip_lightning.core.models.dense_conv`): the same function and parameters, computed without the
        multiplications by zero padding. 0 (default, the released computation) turns it off; 2 does the 2x2
        stages of a 16x16 patch with 16/36 of their convolution MACs; 4 (the most allowed) also the 4x4 stages
        (16/9 of theirs, but as large GEMMs). A speed option only: checkpoints are interchangeable.
    init: ``released`` (PyTorch's default conv init, as the release) or ``kaiming`` (He-normal weights, zero
        biases, ``out`` excepted; :meth:`kaiming_init_`): a deviation for short trainings (the demo), where the
        released init leaves the backbone's token almost without effect on the output for hundreds of steps.
    """

    #: Options that change how the head is computed, not what: a resume may change them (see
    #: :func:`dip_lightning.checkpoint.compatibility.check_compatible`).
    EXECUTION_OPTIONS = ("channels_last", "dense_conv_side")

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        in_channels: int,
        depth: int = 4,
        base_channels: int = 64,
        max_channels: int = 512,
        channels_last: bool = True,
        dense_conv_side: int = 0,
        token_input: TokenInput = "silu_temb",
        init: HeadInit = "released",
    ) -> None:
        super().__init__(hidden_size, patch_size, in_channels, token_input)
        if init not in get_args(HeadInit):
            raise ConfigError(f"init must be one of {', '.join(get_args(HeadInit))}; got {init!r}")
        if not 0 <= dense_conv_side <= MAX_DENSE_CONV_SIDE:
            raise ConfigError(
                f"dense_conv_side must be 0..{MAX_DENSE_CONV_SIDE}, got {dense_conv_side}: the dense matrix of a "
                "side x side map has side**4 x C_in x C_out entries (256 MiB for the paper head's 8x8 decoder stage, "
                "2 GiB for its 16x16 one) "
                "and does side**2/9 times the convolution's work"
            )
        if depth < 1:
            raise ConfigError(f"depth must be >= 1, got {depth}")
        if patch_size % (2**depth):
            raise ConfigError(f"patch_size {patch_size} is not divisible by 2**depth = {2**depth}")
        widths = [min(base_channels * 2**i, max_channels) for i in range(depth)]
        self.widths = widths
        self.channels_last = channels_last
        self.enc = nn.ModuleList(
            _conv3x3_silu(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(widths[-1] + hidden_size, widths[-1], kernel_size=1), nn.SiLU()
        )
        # Stage i of the up path receives widths[i] channels from beneath (the bottleneck keeps the deepest
        # width, every decoder maps to the width of the stage above), doubles the resolution with a
        # channel-preserving transposed conv, concatenates skip i (widths[i]) and maps to the width of
        # stage i-1 (widths[0] on top).
        above = [widths[0], *widths[:-1]]
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w, kernel_size=2, stride=2) for w in widths)
        self.dec = nn.ModuleList(_conv3x3_silu(2 * w, a) for w, a in zip(widths, above))
        self.out = nn.Conv2d(widths[0], in_channels, kernel_size=1)
        # One-hot tap tables of the stages run densely; not persistent, so checkpoints do not depend on them.
        self.dense_conv_side = dense_conv_side
        self.dense_sides = [patch_size >> i for i in range(depth) if (patch_size >> i) <= dense_conv_side]
        for side in self.dense_sides:
            self.register_buffer(f"taps_{side}", conv3x3_taps(side), persistent=False)
        self.init = init
        if init == "kaiming":
            self.kaiming_init_()

    @torch.no_grad()
    def kaiming_init_(self) -> None:
        """He-normal weights (fan-in, ReLU gain) and zero biases for every conv but ``out``.

        PyTorch's default conv init shrinks the signal's variance about 3x per layer, so the token, which enters
        at the bottleneck and crosses 2 * depth + 1 layers, reaches the output about 1000x weaker than the pixels
        that arrive through the skips (bench/results/demo_recipe.md): at the start of training the head barely
        listens to the backbone. Variance-preserving weights make the token's effect about 0.1x the pixels'.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module is not self.out:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, patches: Tensor, tokens: Tensor, cond: Tensor) -> Tensor:
        return self.unet(patches, tokens, channels_last=self.channels_last)

    def unet(self, patches: Tensor, tokens: Tensor, channels_last: bool = False) -> Tensor:
        """The U-Net itself, in the memory layout ``channels_last`` picks."""
        x = patches
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []
        for enc in self.enc:
            x = self._conv3x3_silu(enc, x)
            skips.append(x)
            x = self.pool(x)
        s = tokens.to(x.dtype)[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])
        x = self.bottleneck(torch.cat([x, s], dim=1))
        for up, dec, skip in zip(self.up[::-1], self.dec[::-1], skips[::-1]):
            x = up(x)
            if channels_last:
                # A (N, C, 1, 1) bottleneck is both NCHW- and NHWC-contiguous, and convolutions then pick NCHW:
                # without this the whole up path (3/4 of the head's MACs) silently ran NCHW.
                x = x.contiguous(memory_format=torch.channels_last)
            x = self._conv3x3_silu(dec, torch.cat([x, skip], dim=1))
        return self.out(x)

    def _conv3x3_silu(self, block: nn.Sequential, x: Tensor) -> Tensor:
        side = x.shape[-1]
        if side in self.dense_sides:
            return F.silu(dense_conv3x3(x, block[0], getattr(self, f"taps_{side}")))
        return block(x)


class LinearHead(PatchHead):
    """DiT's FinalLayer (the DiT-only baseline): adaLN shift/scale from c, LayerNorm, Linear(D, C*P*P).

    It ignores the noisy pixels. By default it takes the raw last-block tokens (`token_input="raw"`), as DiT's
    FinalLayer does; `token_input="silu_temb"` feeds it DiP's s instead. The adaLN linear has no leading SiLU
    because DiP's c is already SiLU-ed (released FinalLayer). 3.54M parameters at D=1152, P=16, so
    DiT-only XL/16 totals 628.6M (paper Table 2: 629M).
    """

    def __init__(
        self, hidden_size: int, patch_size: int, in_channels: int, token_input: TokenInput = "raw"
    ) -> None:
        super().__init__(hidden_size, patch_size, in_channels, token_input)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, in_channels * patch_size * patch_size)

    def forward(self, patches: Tensor, tokens: Tensor, cond: Tensor) -> Tensor:
        b = cond.shape[0]
        shift, scale = self.adaLN_modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        x = modulate(self.norm(tokens.reshape(b, -1, self.hidden_size)), shift, scale)
        return self.out(x).reshape(-1, self.in_channels, self.patch_size, self.patch_size)

    @torch.no_grad()
    def zero_init_output_(self) -> None:
        """DiT zero-inits both the FinalLayer's adaLN linear and its output linear."""
        super().zero_init_output_()
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)


class MLPHead(PatchHead):
    """The paper's "standard MLP" head: concat[flattened noisy patch, token] -> Linear/ReLU MLP -> patch.

    No spatial inductive bias (paper Table 2, FID 6.92). num_layers Linear layers, ReLU between them.
    hidden_dim defaults to 2/3 of the input width rounded to a multiple of 64: (768 + 1152) * 2/3 = 1280 at
    XL/16, a 5.08M head and a 630.1M model, matching the paper's 630M.
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        in_channels: int,
        hidden_dim: int | None = None,
        num_layers: int = 3,
        token_input: TokenInput = "silu_temb",
    ) -> None:
        super().__init__(hidden_size, patch_size, in_channels, token_input)
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
        patch_dim = in_channels * patch_size * patch_size
        in_dim = patch_dim + hidden_size
        if hidden_dim is None:
            hidden_dim = max(64, round(2 * in_dim / 3 / 64) * 64)
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(dims[-1], patch_dim)

    def forward(self, patches: Tensor, tokens: Tensor, cond: Tensor) -> Tensor:
        x = torch.cat([patches.flatten(1), tokens.to(patches.dtype)], dim=1)
        return self.out(self.mlp(x)).view_as(patches)


def dct_position_features(patch_size: int, num_freqs: int, device: torch.device | None = None) -> Tensor:
    """2D DCT-II basis values at the P*P pixel centres: (P*P, num_freqs**2), entries in [-1, 1].

    Feature (u, v) of pixel (i, j) is cos(pi u (i + 1/2) / P) * cos(pi v (j + 1/2) / P).
    """
    pos = (torch.arange(patch_size, device=device, dtype=torch.float32) + 0.5) / patch_size
    freqs = torch.arange(num_freqs, device=device, dtype=torch.float32)
    basis = torch.cos(math.pi * pos[:, None] * freqs[None])  # (P, F)
    feats = basis[:, None, :, None] * basis[None, :, None, :]  # (P, P, F, F)
    return feats.reshape(patch_size * patch_size, num_freqs * num_freqs)


class PixelTokenHead(PatchHead):
    """Base of the heads that treat a patch's P*P pixels as tokens: :meth:`pixel_features` maps the pixels
    ``(BN, P*P, C)`` and the backbone token to ``(BN, P*P, width)`` features, which the subclass's ``norm_out``
    and ``out`` (width -> C) turn back into the patch."""

    def pixel_features(self, pixels: Tensor, tokens: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, patches: Tensor, tokens: Tensor, cond: Tensor) -> Tensor:
        bn, c, p, _ = patches.shape
        x = self.pixel_features(patches.flatten(2).transpose(1, 2), tokens)
        return self.out(self.norm_out(x)).transpose(1, 2).reshape(bn, c, p, p)


class CoordMLPHead(PixelTokenHead):
    """PixNerd-like coordinate MLP: the token generates the weights of a small per-pixel MLP (a neural field).

    Each pixel's input is its noisy value plus a DCT positional encoding (C + num_freqs**2 features), embedded
    to `width`. Then `depth` residual blocks x += silu(norm(x) W1) W2, where W1 (width x width*mlp_ratio) and
    W2 (width*mlp_ratio x width) are produced from the token by one Linear per block; W1's columns are
    L2-normalised so the generated layer cannot blow up activations. Output: RMSNorm + Linear(width, C).

    Defaults (width 64, mlp_ratio 2, depth 4, 8x8 DCT freqs) follow PixNerd-XL/16's neural-field size: at
    D=1152 the head is 75.6M and the model 700.6M, the paper's 700M (Table 2).
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        in_channels: int,
        width: int = 64,
        mlp_ratio: int = 2,
        depth: int = 4,
        num_freqs: int = 8,
        token_input: TokenInput = "silu_temb",
    ) -> None:
        super().__init__(hidden_size, patch_size, in_channels, token_input)
        self.width = width
        self.inner = width * mlp_ratio
        self.num_freqs = num_freqs
        self.embed = nn.Linear(in_channels + num_freqs * num_freqs, width)
        self.generators = nn.ModuleList(nn.Linear(hidden_size, 2 * width * self.inner) for _ in range(depth))
        self.norms = nn.ModuleList(RMSNorm(width) for _ in range(depth))
        self.norm_out = RMSNorm(width)
        self.out = nn.Linear(width, in_channels)

    def pixel_features(self, pixels: Tensor, tokens: Tensor) -> Tensor:
        bn = pixels.shape[0]
        pos = dct_position_features(self.patch_size, self.num_freqs, pixels.device).to(pixels.dtype)
        x = self.embed(torch.cat([pixels, pos.expand(bn, -1, -1)], dim=-1))
        for gen, norm in zip(self.generators, self.norms):
            w1, w2 = gen(tokens).split(self.width * self.inner, dim=-1)
            w1 = F.normalize(w1.view(bn, self.width, self.inner), dim=1)
            w2 = w2.view(bn, self.inner, self.width)
            x = x + torch.bmm(F.silu(torch.bmm(norm(x), w1.to(x.dtype))), w2.to(x.dtype))
        return x


class _MultiHeadAttention(nn.Module):
    """Plain multi-head attention (queries from x, keys/values from context), SDPA, no position encoding."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _PixelBlock(nn.Module):
    """Pre-norm block over the pixels of one patch: self-attn, cross-attn to the token, GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = _MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = _MultiHeadAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class AttentionHead(PixelTokenHead):
    """The paper's intra-patch attention head: P*P pixel tokens, self-attention + cross-attention to s_i.

    Pixels are embedded by Linear(C, width) plus a learnable position embedding (P*P x width, N(0, 0.02));
    `depth` pre-norm blocks of self-attention, cross-attention and a GELU MLP; LayerNorm + Linear(width, C)
    out. The token is projected to `context_tokens` key/value tokens of `width` each: with a single context
    token the softmax over one key is identically 1 and cross-attention collapses to adding a fixed projection
    of the token to every pixel; `context_tokens=1` gives that literal reading.

    The paper gives no sizes. Defaults (width 64, depth 3, 4 heads, mlp_ratio 4, 4 context tokens) match the
    conv head's compute (17.9 vs 17.1 GMACs per 256px image at XL/16; the P*P x P*P attention maps dominate
    memory, as the paper notes); the head is then only 0.51M parameters (model 625.5M vs the paper's 630M).
    Getting near 630M would take width 256 (3.4M parameters) and 8x the conv head's MACs (138 GMACs).
    """

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        in_channels: int,
        width: int = 64,
        depth: int = 3,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        context_tokens: int = 4,
        token_input: TokenInput = "silu_temb",
    ) -> None:
        super().__init__(hidden_size, patch_size, in_channels, token_input)
        self.width = width
        self.context_tokens = context_tokens
        self.embed = nn.Linear(in_channels, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, patch_size * patch_size, width))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.context = nn.Linear(hidden_size, context_tokens * width)
        self.blocks = nn.ModuleList(_PixelBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, in_channels)

    def pixel_features(self, pixels: Tensor, tokens: Tensor) -> Tensor:
        x = self.embed(pixels) + self.pos_embed.to(pixels.dtype)
        ctx = self.context(tokens).view(pixels.shape[0], self.context_tokens, self.width)
        for block in self.blocks:
            x = block(x, ctx)
        return x


__all__ = [
    "AttentionHead",
    "CoordMLPHead",
    "LinearHead",
    "MLPHead",
    "PatchDetailerHead",
    "PatchHead",
    "TokenInput",
    "dct_position_features",
]
