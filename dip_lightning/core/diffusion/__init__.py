"""All diffusion math of DiP: the flow-matching objective (``flow_matching``), the samplers (``samplers``), interval
classifier-free guidance (``guidance``) and the seeded noise of sampling (``noise``).

The public names are re-exported here, so YAML names them by the package:
``class_path: dip_lightning.core.diffusion.EulerSampler``.
"""

from __future__ import annotations

from dip_lightning.core.diffusion.flow_matching import (
    LOSS_WEIGHTS,
    SPACES,
    TIME_SAMPLINGS,
    FlowMatching,
    ModelFn,
    convert_prediction,
    shift_time,
)
from dip_lightning.core.diffusion.guidance import (
    check_guide,
    guide_properties,
    guided_velocity,
    in_guidance_interval,
)
from dip_lightning.core.diffusion.noise import NoiseSampler, make_noise, seeded_noise_sampler
from dip_lightning.core.diffusion.samplers import (
    SAMPLER_OVERRIDES,
    SAMPLERS,
    STEP_FUNCTIONS,
    EulerSampler,
    HeunSampler,
    MultistepSampler,
    ODESampler,
    SDESampler,
    override_sampler,
    sampler_overrides,
    score_from_velocity,
)

__all__ = [
    "LOSS_WEIGHTS",
    "SAMPLERS",
    "SAMPLER_OVERRIDES",
    "SPACES",
    "STEP_FUNCTIONS",
    "TIME_SAMPLINGS",
    "EulerSampler",
    "FlowMatching",
    "HeunSampler",
    "ModelFn",
    "MultistepSampler",
    "NoiseSampler",
    "ODESampler",
    "SDESampler",
    "check_guide",
    "convert_prediction",
    "guide_properties",
    "guided_velocity",
    "in_guidance_interval",
    "make_noise",
    "override_sampler",
    "sampler_overrides",
    "score_from_velocity",
    "seeded_noise_sampler",
    "shift_time",
]
