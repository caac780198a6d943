"""The peak FLOP/s of an accelerator, the denominator of model FLOPs utilisation (MFU).

The table holds the vendors' dense bf16 tensor-core figures (no sparsity) per device, matched on the name
``torch.cuda.get_device_name`` reports. A device not in the table (or a CPU) has no known peak: configure one.
"""

from __future__ import annotations

import re

__all__ = ["PEAK_BF16_TFLOPS", "peak_tflops"]

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # (pattern in the device name, dense bf16 TFLOP/s); the first match wins, so variants come before families.
    (r"\bGB200\b", 2500.0),
    (r"\bB200\b", 2250.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM (the name says "NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bMI300X\b", 1307.0),
    (r"\bMI250X\b", 383.0),
)
"""Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, keyed by a pattern of the reported device name."""


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the device called ``device_name`` in TFLOP/s, None when the table has no match."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None
