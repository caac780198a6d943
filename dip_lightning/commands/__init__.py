"""The kit's commands in one registry, and the one flag style they share.

``python -m dip_lightning`` (or the ``dip-lightning`` script) dispatches on the first word: the LightningCLI
subcommands go to :mod:`dip_lightning.training.cli`, every other command to its ``main(argv)``, imported lazily so that
``--help`` stays fast. ``python -m dip_lightning --help`` lists them all.

:func:`run_command` is the one place that ends a failure the kit understands
(:func:`~dip_lightning.core.errors.failure_message`: a ``KitError``, a missing or forbidden path, a full or
read-only disk) as one ``error: <message>`` line on stderr and exit code 2, for every command, LightningCLI's
included; anything else is a bug and keeps its traceback; ``SystemExit`` (argparse's usage errors, the preemption
guard's exit codes) passes through unchanged.

One command-line style for every command, LightningCLI's: each command's parser is a :class:`CommandParser`, a
``jsonargparse.ArgumentParser``, so every command has a typed ``--help``, ``--print_config`` (its options as YAML)
and ``--config FILE.yaml`` (its options from YAML files, later files and flags overriding earlier ones; e.g. a sweep
grid). ``--config`` means that and nothing else: a command that builds a model from experiment YAMLs takes them as
``--experiment``. Flags are written with underscores, as LightningCLI's (``--num_samples``, ``--batch_size``); the
hyphenated spelling (``--batch-size``) is accepted too, hidden from the help. A boolean option takes ``true`` or
``false`` (``--overwrite true``, as LightningCLI's ``--trainer.enable_progress_bar false``); the kit's own also
stand alone (``--overwrite``) and have a ``--no_`` form (``--no_plots``).

A new command: a module here with ``build_parser() -> CommandParser`` and ``main(argv) -> int`` that calls
``build_parser().parse_args(argv)``, and a :class:`Command` line in :data:`COMMANDS`. Declare options with a
``type`` (``str | None``, ``list[float] | None``, a ``jsonargparse.typing`` restricted type) so that help, YAML and
``--print_config`` know them; ``action="store_true"`` (or ``type=bool``) gives a boolean option as above.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from dip_lightning.core.errors import failure_message

__all__ = [
    "COMMANDS",
    "Command",
    "CommandParser",
    "LIGHTNING_COMMANDS",
    "overview",
    "run_command",
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
    # LightningCLI options without a subcommand: LightningCLI says what is missing.
    if argv[0].startswith("-"):
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


#: Top-level keys of an experiment YAML (LightningCLI's), which no command's own options use.
_EXPERIMENT_KEYS = frozenset({"model", "data", "trainer", "seed_everything", "ckpt_path"})


class _CommandConfigFile(ActionConfigFile):
    """``--config``: the command's own options from YAML; an experiment YAML there (the option's old meaning in
    ``sample`` and ``sweep``) is a usage error that names ``--experiment``."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: str | None = None) -> None:
        keys = _experiment_keys(values) - {a.dest for a in parser._actions}
        if keys:
            has_experiment = any("--experiment" in a.option_strings for a in parser._actions)
            fix = (
                f"pass it as --experiment {values}"
                if has_experiment
                else "this command builds no model from an experiment YAML"
            )
            parser.error(
                f"--config {values} is an experiment YAML ({', '.join(sorted(keys))}); --config takes this "
                f"command's own options (`{parser.prog} --print_config` shows them): {fix}"
            )
        super().__call__(parser, cfg, values, option_string)


def _experiment_keys(value: Any) -> set[str]:
    """The experiment-only top-level keys of the YAML file (or shipped recipe) ``value`` names (none for anything
    else)."""
    import yaml

    from dip_lightning.core.recipes import resolve_config

    try:
        path = Path(resolve_config(str(value)))
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return set()  # jsonargparse reports an unreadable file or an unknown name itself
    return set(loaded) & _EXPERIMENT_KEYS if isinstance(loaded, dict) else set()


class CommandParser(ArgumentParser):
    """``jsonargparse.ArgumentParser`` with the kit's flag style (module docstring): ``--config`` and
    ``--print_config`` for the command's own options, ``--snake_case`` options with the ``--kebab-case`` spelling
    accepted, one boolean behaviour.

    ``prog`` defaults to ``python -m dip_lightning <command>``.
    """

    def __init__(self, command: str, **kwargs: Any) -> None:
        kwargs.setdefault("prog", f"python -m dip_lightning {command}")
        kwargs.setdefault("allow_abbrev", False)  # argparse took a typo (--thread) for an option it prefixes
        super().__init__(**kwargs)
        super().add_argument(
            "--config",
            action=_CommandConfigFile,
            help="YAML file of this command's options, in the layout --print_config writes (repeatable; later "
            "files and the flags after it override)",
        )

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        if any(n.startswith("--") and "-" in n[2:] for n in names):
            raise ValueError(f"kit flags use underscores: {names}")
        if kwargs.get("action") == "store_true" or kwargs.get("type") is bool:
            # One boolean behaviour: --flag, --flag true|false, --no_flag.
            kwargs.pop("type", None)
            kwargs["action"] = ActionYesNo()
            kwargs["nargs"] = "?"
            kwargs.setdefault("default", False)
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        argv = self._bare_booleans_closed(
            [self._underscored(a) for a in (sys.argv[1:] if args is None else args)]
        )
        self._check_lists_given_once(argv)
        return super().parse_args(argv, *rest, **kwargs)

    def _bare_booleans_closed(self, argv: list[str]) -> list[str]:
        """``--flag`` not followed by true/false becomes ``--flag=true``, so that the next word (a positional
        argument: ``evaluate --no_cache samples.npz ref.npz``) is not taken for the flag's value."""
        flags = {o for a in self._actions if isinstance(a, ActionYesNo) for o in a.option_strings}
        closed = list(argv)
        for i, arg in enumerate(argv):
            following = argv[i + 1].lower() if i + 1 < len(argv) else None
            if arg in flags and following not in ("true", "false", "yes", "no"):
                closed[i] = f"{arg}=true"
        return closed

    def _check_lists_given_once(self, argv: list[str]) -> None:
        """A list option given twice would keep only its last values (argparse): an error instead."""
        for action in self._actions:
            if action.nargs not in ("+", "*") or not action.option_strings:
                continue
            given = [a for a in argv if a.partition("=")[0] in action.option_strings]
            if len(given) > 1:
                name = action.option_strings[0]
                self.error(f"{name} is given {len(given)} times: list its values once ({name} A B ...)")

    def _underscored(self, arg: str) -> str:
        """``--batch-size=3`` -> ``--batch_size=3`` where that is an option of this parser; else ``arg``."""
        if not arg.startswith("--") or "-" not in arg[2:]:
            return arg
        name, eq, value = arg.partition("=")
        canonical = "--" + name[2:].replace("-", "_")
        known = {o for a in self._actions for o in a.option_strings}
        return canonical + eq + value if canonical in known else arg
