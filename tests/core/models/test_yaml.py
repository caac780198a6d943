"""DiP and its heads are configurable from YAML through jsonargparse (the LightningCLI mechanism)."""

from __future__ import annotations

import argparse

import pytest
import torch
from jsonargparse import ArgumentParser

from dip_lightning.core.models import CoordMLPHead, DiP, PatchDetailerHead

torch.set_num_threads(1)

TINY = {"input_size": 32, "hidden_size": 32, "depth": 2, "num_heads": 2, "num_classes": 5}

YAML = """
net:
  class_path: dip_lightning.core.models.DiP
  init_args:
    input_size: 32
    hidden_size: 32
    depth: 2
    num_heads: 2
    num_classes: 5
    placement: hybrid
    intermediate_block: 1
    head:
      class_path: dip_lightning.core.models.heads.PatchDetailerHead
      init_args: {depth: 2, base_channels: 8}
    intermediate_head:
      class_path: dip_lightning.core.models.heads.CoordMLPHead
      init_args: {width: 8, depth: 1}
"""


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=torch.nn.Module)
    return parser


def instantiate(parser: ArgumentParser, cfg):
    # `instantiate_classes` is deprecated in jsonargparse >= 4.49 in favour of `instantiate`.
    return getattr(parser, "instantiate", None) or parser.instantiate_classes


def test_yaml_with_nested_head_class_paths_instantiates():
    parser = make_parser()
    cfg = parser.parse_string(YAML)
    net = instantiate(parser, cfg)(cfg).net
    assert isinstance(net, DiP) and net.placement == "hybrid" and net.depth == 2
    assert isinstance(net.head, PatchDetailerHead)
    assert net.head.widths == [8, 16] and net.head.hidden_size == 32  # options arrived, geometry injected
    assert isinstance(net.intermediate_head, CoordMLPHead) and net.intermediate_head.width == 8
    x = torch.randn(1, 3, 32, 32)
    assert net(x, torch.rand(1), torch.tensor([net.null_class])).shape == x.shape


def test_dict_config_and_default_head():
    parser = make_parser()
    cfg = parser.parse_object({"net": {"class_path": "dip_lightning.core.models.DiP", "init_args": TINY}})
    net = instantiate(parser, cfg)(cfg).net
    assert isinstance(net.head, PatchDetailerHead) and net.head.widths == [64, 128, 256, 512]


def test_head_short_class_name_works():
    parser = make_parser()
    head = {"class_path": "LinearHead", "init_args": {"token_input": "silu_temb"}}
    cfg = parser.parse_object({"net": {"class_path": "DiP", "init_args": {**TINY, "head": head}}})
    net = instantiate(parser, cfg)(cfg).net
    assert type(net.head).__name__ == "LinearHead" and net.head.token_input == "silu_temb"


@pytest.mark.parametrize(
    ("init_args", "bad_key"),
    [
        ({**TINY, "hidden_sise": 64}, "hidden_sise"),
        (
            {**TINY, "head": {"class_path": "PatchDetailerHead", "init_args": {"base_channel": 8}}},
            "base_channel",
        ),
        ({**TINY, "placement": "middle"}, "middle"),
    ],
)
def test_misspelled_or_invalid_options_fail_naming_the_key(init_args, bad_key):
    parser = make_parser()
    with pytest.raises(argparse.ArgumentError, match=bad_key):
        parser.parse_object({"net": {"class_path": "dip_lightning.core.models.DiP", "init_args": init_args}})
