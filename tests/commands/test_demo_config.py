"""The demo's recipe: crops built at the config's resolution; a config without one is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from dip_lightning.commands.demo import DEFAULT_CONFIG, config_image_size
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.recipes import resolve_config
from tests.helpers.tiny import TINY_CONFIG


def test_demo_builds_crops_at_the_configs_resolution() -> None:
    assert Path(resolve_config(DEFAULT_CONFIG)).name == "demo.yaml"
    assert config_image_size(resolve_config(DEFAULT_CONFIG)) == 64  # the paper's 16x16 patches, 4x4 tokens
    assert config_image_size(TINY_CONFIG) == 32  # the tests' config keeps its own size


def test_config_without_input_size_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "no_size.yaml"
    config.write_text("model:\n  net:\n    class_path: dip_lightning.core.models.DiP\n")
    with pytest.raises(ConfigError, match="model.net.init_args.input_size"):
        config_image_size(config)
