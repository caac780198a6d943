"""REPA (representation alignment) as used by DiP: align a DiT block's tokens with frozen encoder features.

Released recipe (``docs/paper.md §2.3``, PixNerd ``REPATrainer``): the output of DiT block 8 (1-indexed)
goes through a trainable projector ``Linear(D, H) - SiLU - Linear(H, H) - SiLU - Linear(H, E)`` (H = 1152 for
DiP-XL) and is compared token by token with frozen DINOv2 ViT-B/14 patch features of the clean image:
``L_REPA = mean_{batch, tokens}(1 - cos)``, total loss ``L_FM + 0.5 * L_REPA``. The projector trains with the
network in the same optimizer and is not part of the sampling model.

Deviations, on purpose:
- token counts that differ raise an error (the release silently truncates the DiT tokens to the
  encoder's count);
- the frozen encoder is left out of ``state_dict()`` (its weights come from ``weights_path``; checkpoints stay
  small), and a state dict without it loads strictly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dip_lightning.core.encoders import FeatureEncoder
from dip_lightning.core.errors import ConfigError

__all__ = ["REPA"]


class REPA(nn.Module):
    """Projector + frozen encoder + cosine alignment loss.

    Args:
        encoder: the frozen target encoder (YAML ``class_path``, e.g.
            ``dip_lightning.core.encoders.DINOv2Encoder``).
            Its parameters are frozen here (``requires_grad=False``) and it stays in eval mode even when this
            module is put in train mode.
        hidden_size: DiT width D. ``None``: taken from the network by :meth:`bind` (the LightningModule
            does this).
        block: 1-indexed DiT block whose output is aligned (8 in DiP).
        weight: coefficient of the REPA loss in the total loss (0.5 in DiP); applied by the caller.
        projector_dim: hidden width H of the projector MLP (1152 = D in DiP-XL).
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        hidden_size: int | None = None,
        block: int = 8,
        weight: float = 0.5,
        projector_dim: int = 1152,
    ) -> None:
        super().__init__()
        if block < 1:
            raise ConfigError(f"block is 1-indexed and must be >= 1, got {block}")
        if projector_dim < 1:
            raise ConfigError(f"projector_dim must be >= 1, got {projector_dim}")
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.block = int(block)
        self.weight = float(weight)
        self.projector_dim = int(projector_dim)
        self.hidden_size: int | None = None
        self.num_tokens: int | None = None
        self.register_module("projector", None)
        if hidden_size is not None:
            self.bind(hidden_size)
        # Keep the frozen encoder out of checkpoints, and let state dicts without it load strictly.
        self.register_state_dict_post_hook(_drop_encoder_state)
        self.register_load_state_dict_pre_hook(_fill_encoder_state)

    # -- construction ----------------------------------------------------------------------------------------
    def bind(self, hidden_size: int, num_tokens: int | None = None, depth: int | None = None) -> REPA:
        """Attach to a network: build the projector for width ``hidden_size`` (once), record its tokens.

        Called again with the same width it is a no-op; another width is an error (the projector's weights
        would not fit). ``depth`` (number of DiT blocks), when given, checks that :attr:`block` exists.
        """
        hidden_size = int(hidden_size)
        if self.projector is None:
            self.projector = nn.Sequential(
                nn.Linear(hidden_size, self.projector_dim),
                nn.SiLU(),
                nn.Linear(self.projector_dim, self.projector_dim),
                nn.SiLU(),
                nn.Linear(self.projector_dim, self.encoder.embed_dim),
            )
            self.hidden_size = hidden_size
        elif hidden_size != self.hidden_size:
            raise ConfigError(
                f"REPA was built for hidden_size={self.hidden_size}, the network has {hidden_size}"
            )
        if num_tokens is not None:
            self.num_tokens = int(num_tokens)
        if depth is not None and self.block > depth:
            raise ConfigError(f"REPA block={self.block} but the network has only {depth} blocks")
        return self

    def train(self, mode: bool = True) -> REPA:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout/BN updates, whatever the parent's mode
        return self

    # -- loss ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_features(self, clean_images: Tensor) -> Tensor:
        """Encoder features (B, N, E) of clean images in [-1, 1], without autograd history."""
        return self.encoder(clean_images).detach()

    def project(self, hidden_tokens: Tensor) -> Tensor:
        if self.projector is None:
            raise RuntimeError(
                "REPA projector not built: pass hidden_size or call bind(hidden_size=...) first"
            )
        return self.projector(hidden_tokens)

    def loss(self, hidden_tokens: Tensor, clean_images: Tensor) -> Tensor:
        """``mean(1 - cos(projector(h), encoder(x)))`` over batch and tokens, a scalar in [0, 2].

        Args:
            hidden_tokens: (B, N, D) output of DiT block :attr:`block` (gradients flow back into the DiT).
            clean_images: (B, 3, H, W) clean training images in [-1, 1].
        """
        if hidden_tokens.ndim != 3:
            raise ConfigError(f"hidden_tokens must be (B, N, D), got shape {tuple(hidden_tokens.shape)}")
        if self.num_tokens is not None and hidden_tokens.shape[1] != self.num_tokens:
            raise ConfigError(f"REPA expected {self.num_tokens} DiT tokens, got {hidden_tokens.shape[1]}")
        target = self.target_features(clean_images)
        if target.shape[:2] != hidden_tokens.shape[:2]:
            raise ConfigError(
                f"REPA token mismatch: the DiT gives {tuple(hidden_tokens.shape[:2])} (batch, tokens) but "
                f"{type(self.encoder).__name__} gives {tuple(target.shape[:2])} for images of shape "
                f"{tuple(clean_images.shape)}; set the encoder's dit_patch_size to the DiT patch size"
            )
        pred = self.project(hidden_tokens)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        return (1.0 - cos).mean()

    def forward(self, hidden_tokens: Tensor, clean_images: Tensor) -> Tensor:
        return self.loss(hidden_tokens, clean_images)


def _drop_encoder_state(module: REPA, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]


def _fill_encoder_state(
    module: REPA,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # Missing encoder entries get the encoder's current (frozen, file-loaded) values: a no-op copy.
    for key, value in module.encoder.state_dict().items():
        state_dict.setdefault(prefix + "encoder." + key, value)
