"""Parameter counts and forward MACs against docs/paper.md (§1.2, §1.3, §4.2).

Full-size models are built on the meta device: no weights are allocated and FlopCounterMode runs on meta
tensors, so XL counts take well under a second each.
"""

from __future__ import annotations

import pytest
import torch

from dip_lightning.commands.models import main as summary_main
from dip_lightning.core.models import (
    AttentionHead,
    CoordMLPHead,
    MLPHead,
    PatchDetailerHead,
    create_model,
    list_models,
    model_summary,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


@pytest.mark.parametrize("patch_size", [16, 32])
def test_patch_detailer_head_has_paper_parameter_count(patch_size):
    # docs/paper.md §1.3 layer table: 6,968,067 at D=1152, independent of P (the token is tiled at P=32).
    with torch.device("meta"):
        head = PatchDetailerHead(1152, patch_size, 3)
    assert n_params(head) == 6_968_067


def test_dip_xl16_parameters_match_paper():
    s = model_summary(meta_model("DiP-XL/16"))
    assert s["params_head"] == 6_968_067
    assert s["params_backbone"] == 625_021_344  # 625.0M [D] in docs/paper.md §1.2
    assert abs(s["params_total"] - 632.0e6) <= 1e6


def test_dit_only_xl16_parameters_match_paper():
    # Paper Table 2: DiT-only 26L/1152 = 629M (backbone + DiT FinalLayer).
    assert abs(n_params(meta_model("DiT-XL/16")) - 629e6) <= 1e6


@pytest.mark.parametrize(
    ("overrides", "paper"),
    [({"depth": 32}, 772e6), ({"hidden_size": 1280}, 776e6)],
)
def test_scaled_dit_only_baselines_match_table2(overrides, paper):
    assert abs(n_params(meta_model("DiT-XL/16", **overrides)) - paper) / paper < 0.01


def test_widest_dit_only_baseline_is_1_1b():
    # Table 2 prints "1.1B" (two significant digits); this design gives 1.116B.
    total = n_params(meta_model("DiT-XL/16", hidden_size=1536))
    assert round(total / 1e9, 1) == 1.1


@pytest.mark.parametrize(("head", "paper"), [(MLPHead, 630e6), (CoordMLPHead, 700e6), (AttentionHead, 630e6)])
def test_alternative_heads_are_near_table2_totals(head, paper):
    total = n_params(meta_model("DiP-XL/16", head=head))
    assert abs(total - paper) / paper < 0.01


def test_dip_xl16_forward_macs_match_paper():
    # docs/paper.md §1.3: ~110 GMACs backbone + ~17.1 GMACs head = ~127 GMACs per 256px image.
    s = model_summary(meta_model("DiP-XL/16"))
    assert s["gmacs_total"] == pytest.approx(127, rel=0.03)
    assert s["gmacs_backbone"] == pytest.approx(110, rel=0.03)
    assert s["gmacs_head"] == pytest.approx(17.1, rel=0.03)


def test_summary_counts_attention_on_a_real_device():
    # Fused SDPA kernels are invisible to FlopCounterMode; the summary must count the same on CPU and meta.
    torch.manual_seed(0)
    kwargs = {"input_size": 64, "num_classes": 10, "depth": 2, "hidden_size": 64, "num_heads": 4}
    real = model_summary(create_model("DiT-S/16", **kwargs))
    meta = model_summary(meta_model("DiT-S/16", **kwargs))
    assert real["gmacs_total"] == pytest.approx(meta["gmacs_total"], rel=1e-9)


def test_registry_names_and_unknown_name():
    names = list_models()
    for family in ("DiP", "DiT"):
        for size in ("S", "B", "L", "XL"):
            for p in (16, 32):
                assert f"{family}-{size}/{p}" in names
    with pytest.raises(ValueError, match="DiP-XL/16"):
        create_model("DiP-XXL/16")


def test_registry_sizes():
    m = meta_model("DiP-L/16")
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.input_size) == (22, 1024, 16, 16, 256)
    m = meta_model("DiT-B/32")
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.input_size) == (12, 768, 12, 32, 512)
    assert type(m.head).__name__ == "LinearHead"


def test_summary_cli_prints_counts(capsys):
    assert summary_main(["DiP-XL/16"]) == 0
    out = capsys.readouterr().out
    assert "6,968,067" in out and "631,989,411" in out and "127.4" in out
    with pytest.raises(SystemExit):
        summary_main(["NoSuchModel"])
