"""The Hub through huggingface_hub's own API, with no network: a repository found in the Hub's cache layout (as
``snapshot_download`` left it) loads as the folder it holds; a folder that would not load is never pushed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dip_lightning.checkpoint.pretrained import WEIGHTS_FILE, PretrainedFolderError
from dip_lightning.training.pretrained import load_pretrained
from tests.helpers.pretrained import write_tiny_folder
from tests.helpers.weights import assert_same

pytest.importorskip("huggingface_hub")

REPO_ID = "someone/dip-tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(folder: Path, cache: Path) -> None:
    """The Hub cache layout: ``models--<owner>--<name>/{refs/main, snapshots/<commit>/<files>}``."""
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(folder, repo / "snapshots" / REVISION)


def test_from_pretrained_resolves_a_repository_id_in_the_hub_cache_offline(tmp_path: Path) -> None:
    from dip_lightning.training.hub import from_pretrained

    folder = write_tiny_folder(tmp_path / "tiny")
    _cache_with(folder, tmp_path / "cache")
    module = from_pretrained(REPO_ID, cache_dir=tmp_path / "cache", local_files_only=True)
    assert_same(module.net.state_dict(), load_pretrained(folder).net.state_dict())
    seeds = torch.arange(2)
    assert torch.equal(module.generate(seeds, seeds), load_pretrained(folder).generate(seeds, seeds))
    assert_same(from_pretrained(folder).net.state_dict(), module.net.state_dict())  # a local path


def test_push_to_hub_checks_the_folder_before_any_upload(tmp_path: Path) -> None:
    from dip_lightning.training.hub import push_to_hub

    folder = write_tiny_folder(tmp_path / "tiny")
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(PretrainedFolderError, match="truncated or corrupt"):
        push_to_hub(folder, REPO_ID, token="not-used")
