"""The Hugging Face Hub through ``huggingface_hub``'s own API (extra ``hub``): :func:`push_to_hub` uploads a
pretrained folder as a model repository, :func:`from_pretrained` loads one by repository id (downloaded into, or
found offline in, the Hub's cache) or by local path. The folder is the one ``export`` writes, so what is pushed is
exactly what :func:`~dip_lightning.training.pretrained.load_pretrained` reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dip_lightning.checkpoint.pretrained import (
    CARD_FILE,
    CONFIG_FILE,
    GRID_FILE,
    WEIGHTS_FILE,
    read_pretrained_config,
    read_pretrained_weights,
)
from dip_lightning.core.errors import MissingExtraError
from dip_lightning.training.pretrained import load_pretrained

if TYPE_CHECKING:
    import torch

    from dip_lightning.training.module import DiPModule

__all__ = ["FOLDER_FILES", "from_pretrained", "push_to_hub"]

#: The files of a pretrained folder that go to and come from the Hub.
FOLDER_FILES = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, GRID_FILE]


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as err:
        raise MissingExtraError(
            "the Hugging Face Hub needs huggingface_hub: pip install 'dip-lightning[hub]'"
        ) from err
    return huggingface_hub


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload DiP weights (dip-lightning export)",
) -> str:
    """Upload a pretrained folder to the model repository ``repo_id`` (created if missing); returns its URL.

    The folder is checked first (a complete, loadable config and weights file), so nothing broken is pushed.
    """
    hub = _hub()
    read_pretrained_config(folder)
    read_pretrained_weights(folder)
    api = hub.HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        allow_patterns=FOLDER_FILES,
        commit_message=commit_message,
    )
    return f"pushed {folder} to {url}"


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
    device: str | torch.device = "cpu",
) -> DiPModule:
    """The module of a pretrained folder: a local path, else a Hub repository id resolved by
    ``huggingface_hub.snapshot_download`` (the Hub's cache; ``local_files_only`` or ``HF_HUB_OFFLINE=1`` never
    touch the network). Reads JSON and safetensors only (:func:`load_pretrained`)."""
    if Path(name_or_path).is_dir():
        return load_pretrained(name_or_path, device=device)
    hub = _hub()
    folder = hub.snapshot_download(
        str(name_or_path),
        repo_type="model",
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        allow_patterns=FOLDER_FILES,
        library_name="dip-lightning",
    )
    return load_pretrained(folder, device=device)
