"""The peak table matches the names torch reports, variants before their family."""

from __future__ import annotations

import pytest

from dip_lightning.core.peak_flops import PEAK_BF16_TFLOPS, peak_tflops


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("NVIDIA H100 80GB HBM3", r"\bH100\b"),
        ("NVIDIA H100 PCIe", r"\bH100 PCIe\b"),
        ("NVIDIA H100 NVL", r"\bH100 NVL\b"),
        ("NVIDIA H200", r"\bH200\b"),
        ("NVIDIA GH200 480GB", r"\bGH200\b"),
        ("NVIDIA A100-SXM4-80GB", r"\bA100\b"),
        ("NVIDIA A100 80GB PCIe", r"\bA100\b"),
        ("NVIDIA L40S", r"\bL40S\b"),
        ("NVIDIA L4", r"\bL4\b"),
        ("NVIDIA A10", r"\bA10\b"),
        ("AMD Instinct MI300X", r"\bMI300X\b"),
    ],
)
def test_reported_names_find_their_entry(name: str, family: str) -> None:
    assert peak_tflops(name) == dict(PEAK_BF16_TFLOPS)[family]


def test_variants_differ_from_their_family_and_unknown_names_have_no_peak() -> None:
    assert peak_tflops("NVIDIA H100 PCIe") < peak_tflops("NVIDIA H100 80GB HBM3")
    assert peak_tflops("NVIDIA L40S") > peak_tflops("NVIDIA L4")
    assert peak_tflops("NVIDIA A10G") is None  # not the A10
    assert peak_tflops("NVIDIA GeForce RTX 3060") is None
    assert peak_tflops("cpu") is None
