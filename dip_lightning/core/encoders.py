"""Frozen feature encoders for REPA: DINOv2, written here in plain torch.

Contract (:class:`FeatureEncoder`): ``forward(x)`` takes clean images in [-1, 1], shape (B, 3, H, W), and
returns patch features (B, N, embed_dim) with **N equal to the DiT's token count** ``(H / dit_patch_size) * (W
/ dit_patch_size)``; each encoder resizes its input so that its own patch grid equals the DiT grid (DINOv2
with patch 14 behind a DiT with patch 16 at 256 px: 256 -> 224 = 14 * 16, a 16 x 16 grid).

:class:`DINOv2Encoder` reproduces the architecture of ``facebookresearch/dinov2`` (ViT with layerscale, no
registers, bicubic interpolation of the 37 x 37 position grid) with the **same parameter names and shapes** as
the official ``dinov2_vit{s,b,l}14_pretrain.pth`` state dicts, so the released file loads with
``strict=True``. Weights are read from a local file only; nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dip_lightning.core.errors import ConfigError

__all__ = ["FeatureEncoder", "DINOv2ViT", "DINOv2Encoder", "DINOV2_VARIANTS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> (embed_dim, depth, num_heads); all patch 14, trained at 518 px (37 x 37 grid), MLP ratio 4.
DINOV2_VARIANTS: dict[str, tuple[int, int, int]] = {
    "vits14": (384, 12, 6),
    "vitb14": (768, 12, 12),
    "vitl14": (1024, 24, 16),
}


class FeatureEncoder(nn.Module):
    """Base class of REPA target encoders.

    Attributes:
        embed_dim: feature width of the returned tokens.
        dit_patch_size: patch size of the DiT whose token grid the output must match.

    ``forward(x)``: x float in [-1, 1], (B, 3, H, W) -> (B, N, embed_dim), N = (H // dit_patch_size) *
    (W // dit_patch_size), tokens in row-major order (as the DiT's patchify).
    """

    embed_dim: int
    dit_patch_size: int

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The DiT token grid for an input of this size (and so the encoder's output grid)."""
        p = self.dit_patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the DiT patch size {p}")
        return height // p, width // p

    def num_tokens(self, height: int, width: int | None = None) -> int:
        gh, gw = self.token_grid(height, height if width is None else width)
        return gh * gw

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------------
# ViT building blocks (parameter names as in facebookresearch/dinov2)
# ------------------------------------------------------------------------------------------------------------
class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major grid


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # Output features of qkv are laid out [q | k | v], each split into heads: the layout of the official
        # weights, so it must not change.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(head_dim), as the official code
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as nn.GELU() in the official code
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2ViT(nn.Module):
    """The DINOv2 vision transformer (no registers), state-dict compatible with the official checkpoints.

    State dict: ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + G*G, D) with G = img_size // patch_size (37),
    ``mask_token`` (1, D) (unused at inference, kept so the official file loads strictly),
    ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
    mlp.fc2, ls2.gamma}``, ``norm.{weight,bias}``.

    Other input sizes interpolate the patch position grid bicubically exactly as the official
    ``interpolate_pos_encoding`` (scale factor ``(g + 0.1) / G``, no antialiasing), so features match the
    torch.hub model's for the same input.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 14,
        img_size: int = 518,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    @classmethod
    def from_variant(cls, variant: str) -> DINOv2ViT:
        if variant not in DINOV2_VARIANTS:
            raise ConfigError(f"unknown DINOv2 variant {variant!r}; choose one of {sorted(DINOV2_VARIANTS)}")
        dim, depth, heads = DINOV2_VARIANTS[variant]
        return cls(embed_dim=dim, depth=depth, num_heads=heads)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> DINOv2ViT:
        """Random init near the official one (normal 0.02 clipped at 2 std: linears, pos_embed; gamma 1)."""

        def trunc(t: Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=generator).clamp_(-2.0, 2.0) * std)

        trunc(self.pos_embed, 0.02)
        trunc(self.cls_token, 1e-6)
        self.mask_token.zero_()
        fan_in = self.patch_embed.proj.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        self.patch_embed.proj.weight.copy_(
            (torch.rand(self.patch_embed.proj.weight.shape, generator=generator) * 2 - 1) * bound
        )
        self.patch_embed.proj.bias.copy_((torch.rand(self.embed_dim, generator=generator) * 2 - 1) * bound)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc(module.weight, 0.02)
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, _LayerScale):
                module.gamma.fill_(1.0)
        return self

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embedding (1, 1 + grid_h * grid_w, D) for a grid_h x grid_w patch grid."""
        n = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n))
        if (grid_h, grid_w) == (m, m):
            return self.pos_embed
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        # The official code passes a scale factor (grid + 0.1) / M rather than an output size ("historical
        # kludge" against float error); the scale factor also sets the sampling positions, so keep it.
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((grid_h + 0.1) / m, (grid_w + 0.1) / m), mode="bicubic", antialias=False
        )
        if tuple(patch_pos.shape[-2:]) != (grid_h, grid_w):  # pragma: no cover - float guard
            raise RuntimeError(
                f"pos_embed interpolation gave {tuple(patch_pos.shape[-2:])}, not {(grid_h, grid_w)}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(self.pos_embed.dtype)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Official ``forward_features`` outputs: normalized cls/patch tokens and the pre-norm sequence."""
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size).to(
            tokens.dtype
        )
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        return {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1:], "x_prenorm": tokens}

    def forward(self, x: Tensor) -> Tensor:
        """Normalized patch tokens (B, N, D) of an already preprocessed image."""
        return self.forward_features(x)["x_norm_patchtokens"]


# ------------------------------------------------------------------------------------------------------------
# Encoders with the REPA contract
# ------------------------------------------------------------------------------------------------------------
class DINOv2Encoder(FeatureEncoder):
    """Frozen DINOv2 patch features, the REPA target of DiP (ViT-B/14, ``x_norm_patchtokens``, 768-d).

    Preprocessing as the released PixNerd/DiP encoder: [-1, 1] -> [0, 1] -> ImageNet mean/std -> bicubic
    resize (no antialiasing) to ``14 * H / dit_patch_size`` (224 for 256 px with DiT patch 16) -> 16 x 16 =
    256 tokens. The release runs the encoder in bfloat16; here it runs in the ambient precision (fp32, or bf16
    under autocast).

    Args:
        weights_path: local path of the official checkpoint ``dinov2_vitb14_pretrain.pth`` (for ``vitb14``),
            published by facebookresearch/dinov2 (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/
            dinov2_vitb14_pretrain.pth, the file torch.hub's ``dinov2_vitb14`` loads). Never downloaded here.
        dit_patch_size: patch size of the DiT whose token grid the features must match.
        variant: ``vitb14`` (DiP/REPA default), ``vits14`` or ``vitl14`` (then the matching
            ``*_pretrain.pth``).
    """

    def __init__(
        self,
        weights_path: str,
        dit_patch_size: int = 16,
        variant: Literal["vits14", "vitb14", "vitl14"] = "vitb14",
    ) -> None:
        super().__init__()
        self.dit_patch_size = int(dit_patch_size)
        self.variant = variant
        self.weights_path = str(weights_path)
        state = self._read_weights(self.weights_path, variant)
        # Built on the meta device and filled by assignment: no random init of 86M parameters, no copy.
        with torch.device("meta"):
            model = DINOv2ViT.from_variant(variant)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.weights_path} does not match the DINOv2 {variant} architecture (expected the "
                f"official dinov2_{variant}_pretrain.pth state dict): {err}"
            ) from err
        self.model = model
        self.embed_dim = model.embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _read_weights(path: str, variant: str) -> dict[str, Tensor]:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"DINOv2 weights file not found: {path!r}. REPA needs the official DINOv2 {variant} "
                f"checkpoint 'dinov2_{variant}_pretrain.pth' from the facebookresearch/dinov2 release "
                f"(https://dl.fbaipublicfiles.com/dinov2/dinov2_{variant}/dinov2_{variant}_pretrain.pth, the "
                "file torch.hub's dinov2 model loads). Download it on a machine with internet access, copy "
                "it here and set the REPA encoder's YAML key `weights_path` "
                "(model.repa.init_args.encoder.init_args.weights_path) to its path. Nothing is downloaded at "
                "run time."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def preprocess(self, x: Tensor) -> Tensor:
        """[-1, 1] images -> normalized, resized to the encoder grid that equals the DiT grid."""
        gh, gw = self.token_grid(x.shape[-2], x.shape[-1])
        x = ((x + 1.0) * 0.5 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        size = (gh * self.model.patch_size, gw * self.model.patch_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.preprocess(x))
