"""``export``: a run's weights as a pretrained folder in the Hugging Face Hub's layout, with its model card.

The folder (:mod:`dip_lightning.checkpoint.pretrained`) holds ``config.json`` (the network, the objective and
the sampler as the run configured them, the image size and classes, which weights and how far training got),
``model.safetensors`` (those weights only) and ``README.md``: what was trained, the steps and images seen, the
last metrics the run logged up to the exported step and its sample grid of that step, when the run folder has
them, the license and the paper's citation. The weights are any a ``--weights`` request names (EMA by default,
a tracked decay, raw, or a post-hoc reconstruction); released DiP weights export through ``convert``
(:func:`export_released`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dip_lightning.checkpoint.format import DEFAULT_WEIGHTS, STATE_DICT, WeightRequest
from dip_lightning.checkpoint.io import read_checkpoint
from dip_lightning.checkpoint.pretrained import (
    GRID_FILE,
    num_parameters,
    weights_dtype,
    write_pretrained,
)
from dip_lightning.checkpoint.run_folder import CHECKPOINT_FOLDER, GRID_FOLDER, locate_run
from dip_lightning.evaluation.report import ReportError, images_per_step, summarize_run
from dip_lightning.training.loading import load_module, module_from_hparams
from dip_lightning.training.pretrained import model_entry, network_weights

__all__ = ["ExportInfo", "export_pretrained", "export_released", "model_card"]

CITATION = """@article{chen2025dip,
  title   = {DiP: Taming Diffusion Models in Pixel Space},
  author  = {Chen, Zhennan and Zhu, Junwei and Chen, Xu and Zhang, Jiangning and Hu, Xiaobin and
             Zhao, Hanzhen and Wang, Chengjie and Yang, Jian and Tai, Ying},
  journal = {arXiv preprint arXiv:2511.18822},
  year    = {2025}
}"""

_GRID_NAME = re.compile(r"step_(\d+)\.png$")


@dataclass
class ExportInfo:
    """What the model card and ``config.json`` say beyond the network: where the weights come from."""

    source: str  # the checkpoint (or released file) exported
    weights: str  # which weights (weights_label: "ema 0.9999", "raw", "phema std 0.05 at step N" ...)
    step: int | None = None  # optimizer steps of the checkpoint
    images_seen: int | None = None
    metrics: dict[str, tuple[int, float]] = field(default_factory=dict)  # name -> (step, value)
    class_names: list[str] | None = None
    experiment: str | None = None  # the --config files of the fit
    grid: Path | None = None  # the run's sample grid at or before the exported step
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- the card
def _network_line(net: Mapping[str, Any], parameters: int, dtype: str) -> str:
    args = net.get("init_args", {})
    sizes = ", ".join(
        f"{k} {args[k]}" for k in ("hidden_size", "depth", "num_heads", "patch_size") if k in args
    )
    return f"`{net.get('class_path')}` ({sizes}; {parameters / 1e6:.1f}M parameters, {dtype})"


def _sampler_line(sampler: Any) -> str:
    if not isinstance(sampler, Mapping):
        return "the module's default (Euler)"
    args = ", ".join(f"{k}={v}" for k, v in (sampler.get("init_args") or {}).items())
    return f"`{str(sampler.get('class_path', '')).rsplit('.', 1)[-1]}` ({args})"


def _training_lines(info: ExportInfo) -> list[str]:
    lines = [f"- Weights: {info.weights}, from `{Path(info.source).name}`"]
    if info.experiment:
        lines.append(f"- Experiment: {info.experiment}")
    if info.step is not None:
        seen = f", {info.images_seen:,} images seen" if info.images_seen is not None else ""
        lines.append(f"- Trained for {info.step:,} optimizer steps{seen}")
    lines += [f"- {note}" for note in info.notes]
    return lines


def _metric_lines(info: ExportInfo) -> list[str]:
    if not info.metrics:
        return ["No metrics were logged by the run up to this step."]
    rows = ["| metric | value | step |", "| --- | --- | --- |"]
    rows += [f"| {name} | {value:.4g} | {step:,} |" for name, (step, value) in sorted(info.metrics.items())]
    return [
        "As the run logged them during training (MetricsCallback, on its own sample count and reference: "
        "compare with papers only at 50k samples against the ADM reference):",
        "",
        *rows,
    ]


def model_card(config: Mapping[str, Any], info: ExportInfo, parameters: int, dtype: str) -> str:
    """The folder's ``README.md``: Hub metadata, what was trained, the metrics, the grid, use, license, citation."""
    model = config["model"]
    classes = config.get("num_classes")
    names = f" ({', '.join(info.class_names)})" if info.class_names else ""
    lines = [
        "---",
        "license: mit",
        "library_name: dip-lightning",
        "tags:",
        "- diffusion",
        "- pixel-space",
        "- class-conditional-image-generation",
        "- dip",
        "---",
        "",
        f"# DiP, {config.get('image_size')} px, {classes} classes",
        "",
        "A pixel-space diffusion model (DiP: a Diffusion Transformer on large patches and a Patch Detailer Head, "
        "arXiv 2511.18822) trained with dip-lightning.",
        "",
        "## What this is",
        "",
        f"- Network: {_network_line(model['net'], parameters, dtype)}",
        f"- Images: {config.get('image_size')} x {config.get('image_size')}, {classes} classes{names}",
        f"- Sampler: {_sampler_line(model.get('sampler'))}",
        *_training_lines(info),
        "",
        "## Metrics",
        "",
        *_metric_lines(info),
        "",
    ]
    if info.grid is not None:
        lines += ["## Samples", "", f"![samples of the run at step {info.step}]({GRID_FILE})", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from dip_lightning.training.pretrained import load_pretrained",
        "import torch",
        "",
        'module = load_pretrained("path/to/this/folder")  # config.json + model.safetensors, no pickle',
        "images = module.generate(labels=torch.tensor([0, 1]), seeds=torch.tensor([0, 1]))  # in [-1, 1]",
        "```",
        "",
        "or `python -m dip_lightning sample --ckpt_path path/to/this/folder --num_samples 50000 --out s.npz`.",
        "",
        "## License",
        "",
        "MIT (the weights and the code of dip-lightning).",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the run folder
def _run_folder(ckpt_path: Path) -> Path | None:
    """The run folder of a checkpoint in ``<run>/checkpoints/``; None elsewhere."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == CHECKPOINT_FOLDER else None


def _grid_at(run_dir: Path, step: int | None) -> Path | None:
    """The run's newest sample grid (``grids/step_XXXXXXXX.png``) at or before ``step``."""
    _, artefacts = locate_run(run_dir)
    found: dict[int, Path] = {}
    for folder in {artefacts / GRID_FOLDER, run_dir / GRID_FOLDER}:
        for path in folder.glob("step_*.png") if folder.is_dir() else ():
            match = _GRID_NAME.search(path.name)
            if match and (step is None or int(match[1]) <= step):
                found[int(match[1])] = path
    return found[max(found)] if found else None


def _run_details(info: ExportInfo, run_dir: Path) -> None:
    """Fill in the images seen, the metrics, the experiment and the grid from the run folder (what it has)."""
    try:
        summary = summarize_run(run_dir)
    except ReportError as err:
        info.notes.append(f"run folder not read ({err})")
        return
    if info.step is not None:
        per_step = images_per_step(summary.config)
        logged = summary.images_seen if summary.steps == info.step else None
        info.images_seen = logged if logged is not None else (info.step * per_step if per_step else None)
    for name, series in summary.metrics.items():
        points = [(s, v) for s, v in zip(series.steps, series.values) if info.step is None or s <= info.step]
        if points:
            info.metrics[name] = points[-1]
    info.experiment = summary.experiment if summary.configs else None
    info.grid = _grid_at(run_dir, info.step)


def _class_names(checkpoint: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """The training data's class names (``classes.txt`` beside its shards), when still readable."""
    data = checkpoint.get("datamodule_hyper_parameters")
    shards = data.get("train_shards") if isinstance(data, Mapping) else None
    if not shards:
        return None
    from dip_lightning.core.data.shards import expand_shards, read_class_names

    try:  # the data may be gone or remote by export time: the names are a courtesy, not needed to sample
        names = read_class_names(expand_shards(shards))
    except (OSError, ValueError):
        return None
    return names if names and len(names) == num_classes else None


# ------------------------------------------------------------------------------------------------ export
def _folder_config(model: Mapping[str, Any], info: ExportInfo, net: Any) -> dict[str, Any]:
    return {
        "model": dict(model),
        "image_size": int(net.input_size),
        "in_channels": int(net.in_channels),
        "num_classes": int(net.num_classes),
        "patch_size": int(net.patch_size),
        "class_names": info.class_names,
        "weights": info.weights,
        # The file name only: a shared folder should not carry the paths of the machine it was made on.
        "training": {"source": Path(info.source).name, "step": info.step, "images_seen": info.images_seen},
        "license": "mit",
        "paper": "arXiv:2511.18822",
    }


def _write(
    out: str | os.PathLike, model: Mapping[str, Any], module: Any, info: ExportInfo, overwrite: bool
) -> str:
    weights = network_weights(module)
    config = _folder_config(model, info, module.net)
    card = model_card(config, info, num_parameters(weights), weights_dtype(weights))
    files = {GRID_FILE: info.grid.read_bytes()} if info.grid is not None else {}
    write_pretrained(out, config, weights, card, files=files, overwrite=overwrite)
    grid = f", sample grid of {info.grid.name}" if info.grid is not None else ""
    return (
        f"wrote {out}: config.json, model.safetensors ({info.weights}, {num_parameters(weights) / 1e6:.2f}M "
        f"parameters), README.md{grid}"
    )


def export_pretrained(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    weights: WeightRequest | str = DEFAULT_WEIGHTS,
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> str:
    """Write the weights of a kit checkpoint that ``weights`` asks for to the pretrained folder ``out``, with
    its config and model card; returns a summary line. Nothing is written when the checkpoint lacks them or
    ``out`` already holds a folder (unless ``overwrite``)."""
    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path, trust_pickle)
    model = model_entry(checkpoint.get("hyper_parameters"), ckpt_path)
    module = load_module(ckpt_path, weights=weights, trust_pickle=trust_pickle)
    step = checkpoint.get("global_step")
    info = ExportInfo(source=str(ckpt_path), weights=str(module.loaded_weights), step=step)
    info.class_names = _class_names(checkpoint, module.num_classes)
    run_dir = _run_folder(ckpt_path)
    if run_dir is not None:
        _run_details(info, run_dir)
    return _write(out, model, module, info, overwrite)


def export_released(
    checkpoint: Mapping[str, Any], source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> str:
    """Write a kit checkpoint that ``convert`` made of released weights (in memory) as a pretrained folder."""
    model = model_entry(checkpoint.get("hyper_parameters"), source)
    module = module_from_hparams(checkpoint["hyper_parameters"], repa=None, compile=False)
    net = {k.removeprefix("net."): v for k, v in checkpoint[STATE_DICT].items() if k.startswith("net.")}
    module.net.load_state_dict(net, strict=True)
    record = checkpoint.get("dip_conversion") or {}
    info = ExportInfo(source=str(source), weights=f"released: {record.get('weights')}")
    info.notes.append(f"Converted from the released DiP weights ({record.get('model')})")
    return _write(out, model, module, info, overwrite)
