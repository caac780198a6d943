"""DiP: a DiT backbone on large pixel patches plus a per-patch head (docs/paper.md §1.1-§1.6).

Conventions: x in [-1, 1], t in [0, 1] with t=0 noise and t=1 data, output is the flow velocity v = x - eps,
and label index `num_classes` is the null class used for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dip_lightning.core.errors import ConfigError
from dip_lightning.core.models.backbone import (
    ClassEmbedder,
    DiTBlock,
    PatchEmbed,
    TimestepEmbedder,
    patchify,
    rope_2d_grid,
    sincos_pos_embed_2d,
    unpatchify,
)
from dip_lightning.core.models.heads import LinearHead, PatchDetailerHead, PatchHead

HeadFactory = Callable[[int, int, int], PatchHead]
"""Anything that builds a head from (hidden_size, patch_size, in_channels): a head class, or the partial that
jsonargparse makes from `{class_path: ..., init_args: {...}}`."""

Placement = Literal["post_hoc", "intermediate", "hybrid"]
Init = Literal["official", "adaln_zero"]
PosEmbed = Literal["none", "sincos"]

_CHOICES = {"placement": get_args(Placement), "init": get_args(Init), "pos_embed": get_args(PosEmbed)}


def _check_choices(**options: str) -> None:
    for name, value in options.items():
        if value not in _CHOICES[name]:
            raise ConfigError(f"{name} must be one of {', '.join(_CHOICES[name])}; got {value!r}")


class DiP(nn.Module):
    """DiT backbone + head, with the head placed post hoc (default), in the middle of the stack, or both.

    Args:
        input_size: training resolution (square); only used for bookkeeping and summaries, since RoPE is
            computed for whatever grid the input has.
        patch_size: backbone patch size P (16 at 256 px, 32 at 512 px in the paper).
        in_channels: image channels C.
        hidden_size, depth, num_heads, mlp_ratio: backbone width D, number of blocks, heads, SwiGLU ratio.
        num_classes: number of real classes; the embedding table has one more row, the null class.
        head: factory of the final (post-hoc) head, called as head(hidden_size, patch_size, in_channels). None
            picks the placement's default: PatchDetailerHead for "post_hoc" and "hybrid", LinearHead (DiT's
            FinalLayer) for "intermediate", whose detail head lives between blocks instead.
        placement: where the detail head sits (paper Fig 5):
            "post_hoc": after the last block only (the paper's choice, FID 2.16).
            "intermediate": after block `intermediate_block` a head refines the noisy patches from that
                block's tokens; its output patches are projected back into the token stream by a
                Linear(C*P*P, D) and added to the tokens ("Project_in"; the head's token input
                s = silu(t_emb + h_k) plays "Project_out"). The image is then read out by the final `head`
                (LinearHead by default). The intermediate head is not supervised on its own. Paper: FID 2.24.
            "hybrid": both an intermediate head and a post-hoc head (paper: FID 3.53).
        intermediate_block: 1-indexed block after which the intermediate head is injected; None means
            depth // 2 (13 for XL), since the paper does not give it.
        intermediate_head: factory of the intermediate head; None means PatchDetailerHead with paper defaults.
        init: "official" is what the released code does: PyTorch default init everywhere except the embedders
            (patch embed xavier-uniform, zero bias; timestep MLP and class table N(0, 0.02)), no zero-init.
            "adaln_zero" additionally zeroes every block's adaLN linear (blocks start as the identity), the
            output layer of the final head (LinearHead: also its adaLN, as DiT) and the intermediate injection
            projection (the intermediate head keeps a live output so that the projection can learn).
        rope_theta: RoPE base.
        rope_scale: RoPE positions are linspace(0, rope_scale, grid) on each axis (released: 16.0); None gives
            integer positions 0..grid-1.
        qk_norm: per-head RMSNorm on queries and keys (released: True).
        pos_embed: absolute position information added to the tokens after the patch embedding: "none" (the
            release: 2D RoPE only) or "sincos" (DiT's fixed 2D sin-cos table, no parameters). A deviation for
            very short trainings (the demo): with RoPE alone, attention sees only relative offsets, so from pure
            noise a token cannot tell where in the image it is and early samples are a bag of patches.
        time_max_period: max period of the sinusoidal timestep features (released: 10, for t in [0, 1]).
        checkpoint_blocks: recompute the activations of the first this-many blocks in the backward pass instead
            of keeping them (``torch.utils.checkpoint``, non-reentrant): less activation memory for one more
            forward of those blocks. 0 (default) keeps everything. A memory option: same function and gradients.
        checkpoint_head: the same for the final head, which keeps more activations than several blocks
            together (sizes in BENCHMARKS.md).
    """

    #: Options that change how the network is computed, not what: a resume may change them (turning on
    #: activation checkpointing after an out-of-memory); see checkpoint.compatibility.check_compatible.
    EXECUTION_OPTIONS = ("checkpoint_blocks", "checkpoint_head")

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 1152,
        depth: int = 26,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        head: HeadFactory | None = None,
        placement: Placement = "post_hoc",
        intermediate_block: int | None = None,
        intermediate_head: HeadFactory | None = None,
        init: Init = "official",
        rope_theta: float = 10000.0,
        rope_scale: float | None = 16.0,
        qk_norm: bool = True,
        pos_embed: PosEmbed = "none",
        time_max_period: float = 10.0,
        checkpoint_blocks: int = 0,
        checkpoint_head: bool = False,
    ) -> None:
        super().__init__()
        _check_choices(placement=placement, init=init, pos_embed=pos_embed)
        if input_size % patch_size:
            raise ConfigError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if not 0 <= checkpoint_blocks <= depth:
            raise ConfigError(f"checkpoint_blocks must be in [0, depth={depth}], got {checkpoint_blocks}")
        self.checkpoint_blocks = checkpoint_blocks
        self.checkpoint_head = checkpoint_head
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.null_class = num_classes
        self.placement = placement
        self.rope_theta = rope_theta
        self.rope_scale = rope_scale
        self.pos_embed = pos_embed

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=time_max_period)
        self.y_embedder = ClassEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        )

        if placement == "post_hoc":
            self.intermediate_block = None
            self.intermediate_head = None
            self.inject = None
        else:
            k = depth // 2 if intermediate_block is None else intermediate_block
            if not 1 <= k < depth:
                raise ConfigError(f"intermediate_block must be in [1, {depth - 1}], got {k}")
            self.intermediate_block = k
            self.intermediate_head = (intermediate_head or PatchDetailerHead)(
                hidden_size, patch_size, in_channels
            )
            self.inject = nn.Linear(in_channels * patch_size * patch_size, hidden_size)
        default_head = LinearHead if placement == "intermediate" else PatchDetailerHead
        self.head = (head or default_head)(hidden_size, patch_size, in_channels)
        for h in (self.head, self.intermediate_head):
            if h is not None and not isinstance(h, PatchHead):
                raise TypeError(f"heads must be PatchHead subclasses, got {type(h).__name__}")

        if init == "adaln_zero":
            self.zero_init_()

    @torch.no_grad()
    def zero_init_(self) -> None:
        """adaLN-Zero: blocks start as the identity, the final head predicts 0, the injection adds 0."""
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.weight)
            nn.init.zeros_(block.adaLN_modulation.bias)
        self.head.zero_init_output_()
        if self.inject is not None:
            nn.init.zeros_(self.inject.weight)
            nn.init.zeros_(self.inject.bias)

    def _head_tokens(self, head: PatchHead, h: Tensor, t_emb: Tensor) -> Tensor:
        """The token a head sees: s = silu(t_emb + h) (released DiP) or the raw tokens h (DiT FinalLayer)."""
        s = F.silu(t_emb.unsqueeze(1) + h) if head.token_input == "silu_temb" else h
        return s.reshape(-1, self.hidden_size)

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor, return_block: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict the flow velocity v for noisy images x at times t with labels y.

        Args:
            x: (B, C, H, W) noisy images, H and W multiples of patch_size.
            t: (B,) or scalar float times in [0, 1], t=0 noise, t=1 data.
            y: (B,) long labels; `null_class` (== num_classes) is the unconditional label.
            return_block: if k (1-indexed), also return the (B, N, D) output tokens of block k (REPA aligns
                block 8), taken before any intermediate-head injection that follows block k.
        Returns:
            v with x's shape, or (v, hidden) when return_block is given.
        """
        b, c, hgt, wid = x.shape
        p = self.patch_size
        if return_block is not None and not 1 <= return_block <= self.depth:
            raise ValueError(f"return_block must be in [1, {self.depth}], got {return_block}")
        if t.ndim == 0:
            t = t.expand(b)
        patches = patchify(x, p)  # (B, N, C*P*P)
        pixels = patches.reshape(-1, c, p, p)  # (B*N, C, P, P) raw noisy patches for the heads
        rope = rope_2d_grid(
            hgt // p, wid // p, self.hidden_size // self.num_heads, self.rope_theta, self.rope_scale, x.device
        )

        h = self.x_embedder(patches)
        if self.pos_embed == "sincos":
            h = h + sincos_pos_embed_2d(hgt // p, wid // p, self.hidden_size, x.device).to(h.dtype)
        t_emb = self.t_embedder(t).to(h.dtype)
        cond = F.silu(t_emb + self.y_embedder(y))
        hidden = None
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks, start=1):
            if recompute and i <= self.checkpoint_blocks:
                h = checkpoint(block, h, cond, rope, use_reentrant=False)
            else:
                h = block(h, cond, rope)
            if i == return_block:
                hidden = h
            if i == self.intermediate_block:
                refined = self.intermediate_head(
                    pixels, self._head_tokens(self.intermediate_head, h, t_emb), cond
                )
                h = h + self.inject(refined.reshape(b, -1, c * p * p).to(h.dtype))

        tokens = self._head_tokens(self.head, h, t_emb)
        if recompute and self.checkpoint_head:
            out = checkpoint(self.head, pixels, tokens, cond, use_reentrant=False)
        else:
            out = self.head(pixels, tokens, cond)
        v = unpatchify(out, p, c, hgt, wid)
        return v if return_block is None else (v, hidden)

    def head_modules(self) -> dict[str, nn.Module]:
        """Head submodules by attribute name (parameter/FLOP breakdowns, per-group optimiser settings)."""
        heads = {"head": self.head}
        if self.intermediate_head is not None:
            heads["intermediate_head"] = self.intermediate_head
        return heads
