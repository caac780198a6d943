"""Snapshots of a module's weights and their exact comparison, key by key."""

from __future__ import annotations

import torch

STATE = dict[str, torch.Tensor]


def state(weights: STATE | torch.nn.Module) -> STATE:
    """A detached copy of a module's ``state_dict`` (or of a state dict), safe from later in-place updates."""
    items = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return {k: v.detach().clone() for k, v in items.items()}


def assert_same(a: STATE, b: STATE) -> None:
    """The same keys and bit-identical tensors; names the first key that differs."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def differing(a: STATE, b: STATE) -> list[str]:
    """The keys of ``a`` whose tensors differ in ``b``."""
    return [k for k in a if not torch.equal(a[k], b[k])]
