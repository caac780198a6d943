"""The experiment recipes (``experiments/*.yaml``) that ship inside the package, found by name or by path.

The recipes are package data (``dip_lightning/experiments``; in a checkout a link to the top-level
``experiments/`` folder), so an installed kit runs ``fit --config dip_xl16`` from any folder. Every piece of code
that needs a recipe finds it here.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from dip_lightning.core.errors import ConfigError

__all__ = ["recipe_dir", "recipe_names", "recipe_path", "resolve_config", "with_recipe_paths"]

RECIPE_SUFFIXES = (".yaml", ".yml")
# The folder name the README's commands use (`--config experiments/dip_xl16.yaml`); outside a checkout it means
# the shipped copy.
CHECKOUT_FOLDER = "experiments"
_CONFIG_FLAGS = ("--config", "-c")


def recipe_dir() -> Path:
    """The folder of the shipped recipes."""
    return Path(str(resources.files("dip_lightning").joinpath(CHECKOUT_FOLDER)))


def recipe_names() -> list[str]:
    """Every shipped recipe's name: its path under :func:`recipe_dir` without the suffix (``ablations/no_repa``)."""
    root = recipe_dir()
    files = (p for p in root.rglob("*") if p.suffix in RECIPE_SUFFIXES and p.is_file())
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in files)


def _shipped(name: str) -> Path | None:
    stem = name[: -len(Path(name).suffix)] if name.endswith(RECIPE_SUFFIXES) else name
    prefix = f"{CHECKOUT_FOLDER}/"
    stem = stem[len(prefix) :] if stem.startswith(prefix) else stem
    if stem not in recipe_names():
        return None
    return next(p for s in RECIPE_SUFFIXES if (p := recipe_dir() / f"{stem}{s}").is_file())


def recipe_path(name: str) -> Path:
    """The shipped recipe ``name`` (``dip_xl16``, ``ablations/no_repa``; a ``.yaml`` suffix and an
    ``experiments/`` prefix are allowed); a ``ConfigError`` listing the shipped names when there is none."""
    found = _shipped(name.replace(os.sep, "/"))
    if found is None:
        raise ConfigError(
            f"no shipped recipe named {name!r}; give the path of a YAML file or one of: {', '.join(recipe_names())}"
        )
    return found


def _looks_like_inline_yaml(value: str) -> bool:
    # jsonargparse also takes a YAML text as --config ("{trainer: {max_steps: 5}}").
    return any(c in value for c in "\n{}:=") and not value.endswith(RECIPE_SUFFIXES)


def resolve_config(value: str, option: str = "--config") -> str:
    """A ``--config`` value as a file path: a file that exists as given, else the shipped recipe of that name; an
    inline YAML text is returned unchanged. Neither a file nor a recipe: a ``ConfigError`` listing the names, which
    calls the value by the ``option`` the user gave it with."""
    if Path(value).expanduser().is_file() or _looks_like_inline_yaml(value):
        return value
    try:
        # A folder of that name (data/demo seen from data/) cannot be meant: the recipe is.
        return str(recipe_path(value))
    except ConfigError as err:
        if Path(value).expanduser().exists():
            raise ConfigError(
                f"{option} {value} is not a file; give a YAML file or a shipped recipe's name"
            ) from None
        raise ConfigError(f"{option} {value}: no such file, and {err}") from None


def with_recipe_paths(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value through :func:`resolve_config` (both ``--config X`` and
    ``--config=X``); nothing else changes."""
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in _CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.partition("=")[2]))
        else:
            out.append(arg)
    return out
