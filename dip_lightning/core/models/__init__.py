"""DiP model family: backbone pieces, heads, the DiP model and named sizes.

from dip_lightning.core.models import create_model
model = create_model("DiP-XL/16")            # 632.0M parameters, ~127 GMACs per 256px forward
v = model(x, t, y)                           # flow velocity, t=0 noise, t=1 data
"""

from dip_lightning.core.models.dip import DiP, HeadFactory, Placement
from dip_lightning.core.models.heads import (
    AttentionHead,
    CoordMLPHead,
    LinearHead,
    MLPHead,
    PatchDetailerHead,
    PatchHead,
)
from dip_lightning.core.models.registry import MODEL_CONFIGS, create_model, list_models, model_summary

__all__ = [
    "MODEL_CONFIGS",
    "AttentionHead",
    "CoordMLPHead",
    "DiP",
    "HeadFactory",
    "LinearHead",
    "MLPHead",
    "PatchDetailerHead",
    "PatchHead",
    "Placement",
    "create_model",
    "list_models",
    "model_summary",
]
