"""The ``eva8`` command (also ``python -m eva_utils``): summary, train, plot.

Training flags are generated from :class:`~eva_utils.config.Config`, so every hyperparameter
has a flag and its help text is the one in the README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from . import checkpoint
from .config import PRESETS, Config, get_preset
from .errors import EvaError, Interrupted

PROG = "eva8"


def _parse_optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _parse_data(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _parse_augment(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part and part != "none")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (``--train-size``, ``--no-amp``...), default: the preset's."""
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("hyperparameters (default: the preset's value)")
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        options: dict = {"default": None, "help": field.metadata["help"], "dest": field.name}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.name == "augment":
            options.update(type=_parse_augment, metavar="LIST")
        elif field.name == "data":
            options.update(type=_parse_data, metavar="PATH")
        elif kind == int | None:
            options.update(type=_parse_optional_int, metavar="N")
        else:
            options.update(type=kind, metavar=field.name.upper().replace("_", "-"))
        group.add_argument(flag, **options)


def config_from_args(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    return get_preset(args.preset).replace(**{k: v for k, v in given.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="ResNet18 with Ghost BatchNorm on CIFAR-10 (EVA8 session 8)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    summary = commands.add_parser("summary", help="print the torchsummary table of the model")
    summary.add_argument(
        "--preset", choices=list(PRESETS), default=None,
        help="the preset's model (GBN, dropout); default: plain resnet18(), the assignment's table",
    )  # fmt: skip

    train = commands.add_parser(
        "train", help="train a preset, writing metrics, checkpoints, graphs"
    )
    train.add_argument("--preset", default="session8", help=f"one of {', '.join(PRESETS)}")
    train.add_argument("--out", type=Path, help="run folder, e.g. runs/NAME")
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(train)

    plot = commands.add_parser("plot", help="redraw the graphs of a run from its metrics.json")
    plot.add_argument("metrics", type=Path, help="runs/NAME/metrics.json")
    plot.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    plot.add_argument(
        "--caption", default=None, help="second title line (default: the run, from metrics.json)"
    )
    return parser


def cmd_summary(args: argparse.Namespace) -> None:
    from .engine import build_model
    from .model import resnet18
    from .summary import print_summary

    model = resnet18() if args.preset is None else build_model(get_preset(args.preset))
    print_summary(model)


def cmd_train(args: argparse.Namespace) -> None:
    from .engine import fit, summarize_history
    from .plots import save_history_figures

    if args.resume is not None:
        out = args.resume
        changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
        config = checkpoint.resume_config(
            out, **{k: v for k, v in changes.items() if v is not None}
        )
    elif args.out is None:
        raise EvaError("train needs --out runs/NAME (or --resume runs/NAME)")
    else:
        out, config = args.out, config_from_args(args)
    history = fit(config, out=out, resume=args.resume is not None, progress=not args.quiet)
    figures = save_history_figures(history, out)
    s = summarize_history(history)
    reached = f"epoch {s['target_epoch']}" if s["target_epoch"] else "not reached"
    print(
        f"best test accuracy {s['best_acc']:.2%} (epoch {s['best_epoch']}), "
        f"final {s['final_acc']:.2%}; {s['target']:.0%} target: {reached}; "
        f"{s['seconds_per_epoch']:.1f} s/epoch"
    )
    print(f"wrote {out / checkpoint.METRICS}, {out / checkpoint.BEST}, {out / checkpoint.LAST}, "
          + ", ".join(str(p) for p in figures))  # fmt: skip


def cmd_plot(args: argparse.Namespace) -> None:
    from .plots import save_history_figures

    metrics = checkpoint.read_metrics(args.metrics)
    caption = args.caption if args.caption is not None else checkpoint.describe_run(metrics)
    for path in save_history_figures(metrics["history"], args.out, caption):
        print(f"wrote {path}")


COMMANDS = {"summary": cmd_summary, "train": cmd_train, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except Interrupted as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    except EvaError as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0
