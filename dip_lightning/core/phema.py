"""Post-hoc EMA with power-function profiles: the math (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 3 and App. C).

A power-function EMA with exponent gamma averages the weights of steps ``tau <= t`` with the profile
``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)``, of relative width
``std = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``. It is tracked by ``ema <- lerp(ema, w, 1 - decay_t)`` with
``decay_t = (1 - 1/t)^(gamma + 1)`` at optimizer step t (1-based; edm2 counts images: the same at a constant batch
size). Any other profile at a stored step is the least-squares combination of stored profiles: ``A x = b`` with
``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>`` in closed form, then ``x /= sum(x)`` as edm2 does. The tracked
discrete EMA follows its continuous profile only approximately in the first steps, so a reconstruction matches a
directly tracked EMA of the same std only approximately. Snapshot files and the reconstruction of weights are in
:mod:`dip_lightning.checkpoint.posthoc`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dip_lightning.core.errors import ConfigError

MAX_STD = float(np.sqrt(1 / 12))
"""The std of the uniform average of all steps (gamma = 0): power-function profiles are narrower (0.2887)."""


# ---------------------------------------------------------------------------------------------- profiles
def std_to_exponent(std: float) -> float:
    """The exponent gamma of the power-function profile of relative width ``std`` (0 < std < :data:`MAX_STD`)."""
    std = float(std)
    if not 0.0 < std < MAX_STD:
        raise ConfigError(f"a power-function EMA's std lies in (0, {MAX_STD:.4f}), got {std}")
    inv = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def exponent_to_std(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma``."""
    gamma = float(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_ema_decay(std: float, step: int) -> float:
    """The decay of the update at optimizer step ``step`` (1-based) that tracks the profile of ``std``."""
    return float((1.0 - 1.0 / step) ** (std_to_exponent(std) + 1.0))


def profile_inner_product(step_a: float, std_a: float, step_b: float, std_b: float) -> float:
    """``<p_a, p_b> = integral of p_a(tau) p_b(tau) dtau`` of two power-function profiles ending at ``step_a`` and
    ``step_b``: ``(ga + 1)(gb + 1) m^(ga + gb + 1) / ((ga + gb + 1) t_a^(ga + 1) t_b^(gb + 1))``, m = min(t_a, t_b)."""
    ga, gb = std_to_exponent(std_a), std_to_exponent(std_b)
    ta, tb = float(step_a), float(step_b)
    # In ratios, so that large steps do not overflow: m^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)).
    scale = (min(ta, tb) / ta) ** (ga + 1) * (min(ta, tb) / tb) ** (gb + 1) / min(ta, tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * scale


def reconstruction_coefficients(inputs: Sequence[tuple[int, float]], step: int, std: float) -> np.ndarray:
    """Coefficients of the stored profiles ``inputs`` (``(step, std)`` pairs) whose sum comes closest, in least
    squares, to the profile of ``std`` ending at ``step``; normalised to sum to 1."""
    gram = np.array([[profile_inner_product(*a, *b) for b in inputs] for a in inputs], dtype=np.float64)
    target = np.array([profile_inner_product(*a, step, std) for a in inputs], dtype=np.float64)
    coefficients = np.linalg.solve(gram, target)
    return coefficients / coefficients.sum()
