"""A tiny random REPA encoder, so that tests exercise REPA's code path on CPU without DINOv2 weights
(YAML: ``class_path: tests.helpers.tiny_encoder.TinyViTEncoder``, the repository on the path)."""

from __future__ import annotations

import torch
from torch import Tensor

from dip_lightning.core.encoders import DINOv2ViT, FeatureEncoder


class TinyViTEncoder(FeatureEncoder):
    """A small, randomly initialised ViT with the encoder contract.

    Its patch size equals the DiT's, so no resizing is needed; the position grid (``grid_size``) is
    interpolated like DINOv2's for other image sizes. The weights are a pure function of ``seed`` (drawn from
    a private ``torch.Generator``, the global RNG is untouched), so two runs align to the same random
    features.

    It is **not** a meaningful representation; REPA with it only exercises the code path.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        dit_patch_size: int = 16,
        grid_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dit_patch_size = int(dit_patch_size)
        self.embed_dim = int(embed_dim)
        self.seed = int(seed)
        self.model = DINOv2ViT(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            patch_size=dit_patch_size,
            img_size=grid_size * dit_patch_size,
        )
        self.model.init_weights(torch.Generator().manual_seed(self.seed))

    def forward(self, x: Tensor) -> Tensor:
        self.token_grid(x.shape[-2], x.shape[-1])  # validates divisibility
        return self.model(x)
