"""The shipped recipes: every YAML of experiments/ found by name, paths passed through, a clear error otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from dip_lightning.core.errors import ConfigError
from dip_lightning.core.recipes import (
    recipe_dir,
    recipe_names,
    recipe_path,
    resolve_config,
    with_recipe_paths,
)
from tests.helpers import REPO


def test_every_yaml_of_the_checkout_is_a_shipped_recipe() -> None:
    files = {
        p.relative_to(REPO / "experiments").with_suffix("").as_posix()
        for p in REPO.glob("experiments/**/*.yaml")
    }
    assert set(recipe_names()) == files
    assert {"tiny_cpu", "dip_xl16", "ablations/no_repa"} <= files
    assert recipe_dir().resolve() == (REPO / "experiments").resolve()


@pytest.mark.parametrize(
    "name", ["tiny_cpu", "tiny_cpu.yaml", "experiments/tiny_cpu.yaml", "experiments/tiny_cpu"]
)
def test_a_recipe_is_found_by_name_with_or_without_suffix_and_folder(name: str) -> None:
    assert recipe_path(name).read_bytes() == (REPO / "experiments" / "tiny_cpu.yaml").read_bytes()


def test_an_ablation_is_found_by_its_relative_name() -> None:
    assert recipe_path("ablations/head_mlp").name == "head_mlp.yaml"


def test_an_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="no shipped recipe named 'dip_xl61'") as info:
        recipe_path("dip_xl61")
    assert "dip_xl16" in str(info.value) and "ablations/no_repa" in str(info.value)


def test_resolve_config_keeps_an_existing_file_and_inline_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local file named like a recipe wins over the shipped one: the user's own file is what they meant.
    monkeypatch.chdir(tmp_path)
    Path("tiny_cpu").write_text("trainer: {max_steps: 1}\n")
    assert resolve_config("tiny_cpu") == "tiny_cpu"
    assert resolve_config("{trainer: {max_steps: 3}}") == "{trainer: {max_steps: 3}}"
    assert resolve_config("dip_xl16") == str(recipe_path("dip_xl16"))


def test_resolve_config_outside_the_checkout_finds_the_readme_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no experiments/ folder here: the shipped copy is meant
    assert Path(resolve_config("experiments/ablations/no_repa.yaml")) == recipe_path("ablations/no_repa")


def test_resolve_config_refuses_a_missing_file_and_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file.*tiny_cpu"):
        resolve_config(str(tmp_path / "mine.yaml"))
    with pytest.raises(ConfigError, match="is not a file"):
        resolve_config(str(tmp_path))


def test_a_folder_named_like_a_recipe_does_not_hide_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `demo` run from data/ or runs/ (each holds a demo/ folder) refused its own default `--experiment demo`.
    monkeypatch.chdir(tmp_path)
    Path("demo").mkdir()
    assert resolve_config("demo", "--experiment") == str(recipe_path("demo"))
    Path("mine").mkdir()
    with pytest.raises(ConfigError, match="--config mine is not a file"):
        resolve_config("mine")


def test_with_recipe_paths_rewrites_every_config_flag_and_nothing_else() -> None:
    tiny = str(recipe_path("tiny_cpu"))
    argv = [
        "fit",
        "--config",
        "tiny_cpu",
        "-c",
        "ablations/no_repa",
        "--config=dip_l16",
        "--trainer.max_steps=3",
    ]
    assert with_recipe_paths(argv) == [
        "fit",
        "--config",
        tiny,
        "-c",
        str(recipe_path("ablations/no_repa")),
        f"--config={recipe_path('dip_l16')}",
        "--trainer.max_steps=3",
    ]
