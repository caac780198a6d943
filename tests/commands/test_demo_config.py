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


def test_recipes_of_different_resolutions_read_different_data_folders() -> None:
    # tiny_cpu (32 px) read data/demo, where `make demo` builds 64 px crops and their reference: its end-of-run
    # patch seam then refused ("samples are 32x32 but the reference images are 64x64").
    import yaml

    sizes: dict[str, set[int]] = {}
    for recipe in sorted((Path(resolve_config(DEFAULT_CONFIG)).parent).glob("*.yaml")):
        config = yaml.safe_load(recipe.read_text())
        shards = config["data"]["init_args"]["train_shards"]
        references = [
            c["init_args"]["reference"]
            for c in config["trainer"].get("callbacks") or []
            if c["class_path"].endswith("MetricsCallback")
        ]
        folder = str(Path(shards).parent)
        assert all(str(Path(r).parent) == folder for r in references), recipe.name
        sizes.setdefault(folder, set()).add(config_image_size(recipe))
    assert all(len(s) == 1 for s in sizes.values()), sizes
