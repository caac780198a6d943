"""The kit's commands in one registry, and the one flag style they share.

``python -m dip_lightning`` (or the ``dip-lightning`` script) dispatches on the first word: the LightningCLI
subcommands go to :mod:`dip_lightning.training.cli`, every other command to its ``main(argv)``, imported lazily so that
``--help`` stays fast. ``python -m dip_lightning --help`` lists them all.

:func:`run_command` is the one place that ends a failure the kit understands
(:func:`~dip_lightning.core.errors.failure_message`: a ``KitError``, a missing or forbidden path, a full or
read-only disk) as one ``error: <message>`` line on stderr and exit code 2, for every command, LightningCLI's
included; anything else is a bug and keeps its traceback; ``SystemExit`` (argparse's usage errors, the preemption
guard's exit codes) passes through unchanged.

Flags are written with underscores, as LightningCLI's (``--num_samples``, ``--batch_size``); the hyphenated
spelling (``--batch-size``) is accepted too, hidden from the help. Every command's parser is a
:class:`CommandParser`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dip_lightning.core.errors import failure_message

__all__ = [
    "COMMANDS",
    "Command",
    "CommandParser",
    "LIGHTNING_COMMANDS",
    "overview",
    "run_command",
    "weight_request",
]


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    module: str | None = (
        None  # the module of dip_lightning.commands whose main(argv) runs it; None: LightningCLI
    )


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("fit", "train (and resume) an experiment: fit --config experiments/<exp>.yaml"),
        Command("validate", "validation loss of a checkpoint: validate --config ... --ckpt_path ..."),
        Command("test", "LightningCLI test loop (same arguments as validate)"),
        Command("predict", "generate uint8 images with Lightning's predict loop"),
        Command("sample", "export N samples in the ADM evaluator's npz format", "sample"),
        Command(
            "evaluate", "FID, sFID, IS, precision, recall, patch seam, FD-DINOv2 of a sample npz", "evaluate"
        ),
        Command(
            "fid-stats",
            "reference file (statistics, features, seam profile) of real shards or images",
            "fid_stats",
        ),
        Command("report", "compare runs: one table row per run, each metric against training step", "report"),
        Command("sweep", "evaluate a checkpoint over weights x guidance settings (resumable)", "sweep"),
        Command("convert", "released DiP weights <-> kit checkpoints", "convert"),
        Command(
            "export", "a checkpoint's weights as a Hub folder: config.json, model.safetensors, card", "export"
        ),
        Command(
            "ema-reconstruct",
            "post-hoc EMA: any power-function EMA std from a run's snapshots",
            "ema_reconstruct",
        ),
        Command("prepare", "WebDataset shards from an image folder (ImageNet)", "prepare"),
        Command("demo", "the whole kit on CPU in minutes: data, training, grid, metrics", "demo"),
        Command("demo-data", "build the embedded real-image demo dataset", "demo_data"),
        Command("models", "parameters and GMACs of a named model size", "models"),
    )
}


def _canonical(name: str) -> str:
    return name.replace("_", "-")


def overview() -> str:
    """The top-level help: every command with its line."""
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: python -m dip_lightning <command> [options]    (or: dip-lightning <command> ...)",
        "",
        "DiP experiment kit: pixel-space diffusion with a Patch Detailer Head (arXiv 2511.18822).",
        "",
        "commands:",
        *(f"  {c.name:{width}s}  {c.summary}" for c in COMMANDS.values()),
        "",
        "`python -m dip_lightning <command> --help` shows a command's options; fit/validate/test/predict are",
        "LightningCLI subcommands (--config, --print_config, dotted overrides such as --trainer.max_steps=100).",
        "--config takes a YAML file or a shipped recipe's name (--config tiny_cpu); --version prints the version.",
    ]
    return "\n".join(lines)


def _lightning(argv: list[str]) -> int:
    from dip_lightning.training.cli import cli_main

    # LightningCLI reads sys.argv itself; passing the same list again only triggers its "both given" warning.
    cli_main(None if argv == sys.argv[1:] else argv)
    return 0


def run_command(argv: Sequence[str]) -> int:
    """Run ``argv`` (``[command, *options]``); returns the exit code (2 for a failure the kit understands)."""
    thread_failures: list[tuple[str, str]] = []
    message = None
    with _threads_failing_quietly(thread_failures):
        try:
            return _dispatch(list(argv))
        except Exception as err:
            message = failure_message(err)
            if message is None:
                raise
            print(_error_line(message), file=sys.stderr)
            return 2
        finally:
            for thread, text in thread_failures:
                if text != message:
                    print(f"warning: thread {thread} failed: {text}", file=sys.stderr)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    if argv[0] in ("--version", "-V"):
        from dip_lightning import __version__

        print(f"dip-lightning {__version__}")
        return 0
    if argv[0].startswith(
        "-"
    ):  # LightningCLI options without a subcommand: LightningCLI says what is missing
        return _lightning(argv)
    command = COMMANDS.get(_canonical(argv[0]))
    if command is None:
        print(overview())
        print(f"\nerror: unknown command {argv[0]!r}")
        return 2
    if command.module is None:
        return _lightning([command.name, *argv[1:]])
    main = importlib.import_module(f"{__name__}.{command.module}").main
    return int(main(argv[1:]) or 0)


def _error_line(message: str) -> str:
    """``error: <message>``; in a job of several processes each prints its own, so it names its rank."""
    from dip_lightning.core.distributed import launch_place

    place = launch_place()
    return f"error: rank {place.rank}: {message}" if place.world_size > 1 else f"error: {message}"


@contextlib.contextmanager
def _threads_failing_quietly(failures: list[tuple[str, str]]) -> Iterator[None]:
    """A thread that dies of a failure the kit understands prints no traceback but joins ``failures`` (its
    name, the message). TensorBoard's writer thread, for one, dies of a full or read-only disk and its owner
    re-raises the same error in the main thread, which reports it; anything else keeps the usual report."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        message = failure_message(args.exc_value) if args.exc_value is not None else None
        if message is None:
            previous(args)
        else:
            failures.append((args.thread.name if args.thread is not None else "?", message))

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class CommandParser(argparse.ArgumentParser):
    """``argparse`` with the kit's flag style: ``--snake_case`` options, the ``--kebab-case`` spelling accepted.

    ``prog`` defaults to ``python -m dip_lightning <command>``.
    """

    def __init__(self, command: str, **kwargs: Any) -> None:
        kwargs.setdefault("prog", f"python -m dip_lightning {command}")
        super().__init__(**kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        if any(n.startswith("--") and "-" in n[2:] for n in names):
            raise ValueError(f"kit flags use underscores: {names}")
        action = super().add_argument(*names, **kwargs)
        aliases = [f"--{n[2:].replace('_', '-')}" for n in names if n.startswith("--") and "_" in n]
        if aliases:
            alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("required", "help", "default")}
            alias_kwargs.setdefault("dest", action.dest)
            super().add_argument(*aliases, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **alias_kwargs)
        return action


def weight_request(text: str) -> Any:
    """A ``--weights`` value (:class:`~dip_lightning.checkpoint.format.WeightRequest`); argparse shows the
    message of a bad one, which names the accepted forms."""
    from dip_lightning.checkpoint.format import WeightRequest

    try:
        return WeightRequest.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
