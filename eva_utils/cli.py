"""The ``eva8`` command (also ``python -m eva_utils``): summary, train, sweep, plot, rf,
analyze, figures, compare.

Training flags are generated from :class:`~eva_utils.config.Config`, so every hyperparameter
has a flag and its help text is the one in the README table. Heavy modules (torch, matplotlib)
load inside the commands, after :func:`main` has taken charge of Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from .config import PRESETS, Config, add_config_flags, get_preset
from .errors import (
    ConfigError,
    EvaError,
    Interrupted,
    RunFileError,
    command_line_words,
    epochs_held,
)
from .files import check_output_file, check_output_folder
from .signals import signals_deferred, sigterm_as_interrupt

PROG = "eva8"
DEFAULT_PRESET = "session8"
COMPARISON_PNG = "comparison.png"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def config_from_args(args: argparse.Namespace) -> Config:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    preset = get_preset(args.preset or DEFAULT_PRESET)
    return preset.replace(**{k: v for k, v in given.items() if v is not None})


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
    train.add_argument(
        "--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: {DEFAULT_PRESET})"
    )
    train.add_argument("--out", type=Path, help="run folder, e.g. runs/NAME")
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(train)

    sweep = commands.add_parser(
        "sweep",
        help="train every cell of a grid of recipe fields for several seeds, each an ordinary "
        "run folder, and summarise them (sweep.json, sweep.png); the same command continues",
    )
    sweep.add_argument(
        "--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: {DEFAULT_PRESET})"
    )
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="FIELD=V1,V2",
        help="a recipe field and its values (repeat for more fields; every combination is a "
        "cell), e.g. --grid num_splits=1,2,4,8 --grid dropout=0,0.1",
    )  # fmt: skip
    sweep.add_argument(
        "--seeds", default=None, metavar="S1,S2", help="seeds of every cell (default: --seed)"
    )
    sweep.add_argument("--out", type=Path, help="sweep folder: one run folder per cell and seed")
    sweep.add_argument(
        "--parallel", type=_positive_int, default=1, metavar="N",
        help="runs trained at a time, each in its own process (default 1: in this process)",
    )  # fmt: skip
    sweep.add_argument(
        "--shard", default=None, metavar="I/N",
        help="train only part I of N of the plan (e.g. one task of a cluster's job array, all "
        "into the same --out); --summarize DIR then summarises every part",
    )  # fmt: skip
    sweep.add_argument(
        "--summarize", type=Path, metavar="DIR",
        help="train nothing: write DIR/sweep.json and DIR/sweep.png from the runs there",
    )  # fmt: skip
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(sweep)

    plot = commands.add_parser("plot", help="redraw the graphs of a run from its metrics.json")
    plot.add_argument("metrics", type=Path, help="runs/NAME/metrics.json")
    plot.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    plot.add_argument(
        "--caption", default=None, help="second title line (default: the run, from metrics.json)"
    )

    rf = commands.add_parser(
        "rf", help="print every layer's receptive field (kernel, stride, jump, rf, start)"
    )
    rf.add_argument(
        "--preset", choices=list(PRESETS), default=None,
        help="the preset's model (GBN, dropout); default: plain resnet18()",
    )  # fmt: skip

    analyze = commands.add_parser(
        "analyze",
        help="confusion matrix, per-class accuracy, misclassified images and effective "
        "receptive fields of a trained run",
    )
    analyze.add_argument("run", type=Path, help="run folder holding best.pt, e.g. runs/NAME")
    analyze.add_argument(
        "--out", type=Path,
        help="folder for the PNG files and analysis.json, their numbers (default: the run)",
    )  # fmt: skip
    analyze.add_argument(
        "--data", metavar="PATH", default=None,
        help="evaluate on this data source instead of the run's (same test subset size)",
    )  # fmt: skip
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    analyze.add_argument(
        "--erf-images", type=_positive_int, default=128, metavar="N",
        help="test images averaged for each effective receptive field",
    )  # fmt: skip
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")

    figures = commands.add_parser(
        "figures",
        help="redraw every figure of a result folder (metrics.json, and analysis.json if there) "
        "without training or a checkpoint",
    )
    figures.add_argument(
        "results", type=Path, help="folder with metrics.json and analysis.json, e.g. results/NAME"
    )
    figures.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    figures.add_argument(
        "--data", metavar="PATH", default=None,
        help="read the misclassified images from this data source instead of the run's",
    )  # fmt: skip

    compare = commands.add_parser(
        "compare",
        help="overlay the validation accuracy and loss of several runs and print their table",
    )
    compare.add_argument(
        "runs", type=Path, nargs="+", metavar="RUN",
        help="run folders holding metrics.json (runs/NAME, results/NAME)",
    )  # fmt: skip
    compare.add_argument(
        "--out", type=Path, required=True,
        help=f"folder for {COMPARISON_PNG}, or the .png file to write",
    )  # fmt: skip
    return parser


def cmd_summary(args: argparse.Namespace) -> None:
    from .recipe import preset_model
    from .summary import print_summary

    print_summary(preset_model(args.preset))


def cmd_train(args: argparse.Namespace) -> None:
    from .data import check_out_of_data
    from .plots import save_history_figures
    from .results import summarize_history, target_reached
    from .runfolder import BEST, LAST, METRICS, recorded_device
    from .training import fit, open_run_folder, run_settings, start_ranks

    if args.resume is not None:
        out = args.resume
        check_output_folder(out, "--resume")  # first: a name too long fails any look
        if args.out is not None and args.out.resolve() != out.resolve():
            raise ConfigError("give --out (a new run) or --resume (an existing one), not both")
        if args.preset is not None:
            raise ConfigError(
                f"--preset cannot change a resumed run: {out} continues with the settings in its "
                "checkpoint (flags such as --epochs still apply)"
            )
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
        changes = {name: value for name, value in given.items() if value is not None}
        settings = {"resume": str(out), **changes}  # what every rank must have been given
        ranks = start_ranks(args.device or recorded_device(out), None, settings)
        with open_run_folder(ranks, out, resume=True) as folder:
            config = folder.resumed_config(**changes)
            done = folder.epochs_done
            if done >= config.epochs:
                if not ranks.is_main:
                    return
                print(
                    f"{out} is already complete: it holds {epochs_held(done)} and --epochs is "
                    f"{config.epochs}, so there is nothing to train (give --epochs above {done} "
                    "to train longer)"
                )
                return
            history = fit(config, out=folder, progress=not args.quiet)
    elif args.out is None:
        raise EvaError("train needs --out runs/NAME (or --resume runs/NAME)")
    else:
        out, config = args.out, config_from_args(args)
        check_out_of_data(out, config.data)
        ranks = start_ranks(config.device, config.batch_size, run_settings(config, out))
        # Before loading any data: refusing takes a second, not a data set's loading time.
        with open_run_folder(ranks, out, resume=False) as folder:
            history = fit(config, out=folder, progress=not args.quiet)
    if not ranks.is_main:  # the main process reports the run
        return
    figures = save_history_figures(history, out)
    s = summarize_history(history)
    chosen = "" if s["best_val_acc"] is None else f", chosen on validation {s['best_val_acc']:.2%}"
    print(
        f"best test accuracy {s['best_acc']:.2%} (epoch {s['best_epoch']}{chosen}), "
        f"final {s['final_acc']:.2%}; {s['target']:.0%} target: {target_reached(s)}; "
        f"{s['seconds_per_epoch']:.1f} s/epoch"
    )
    print(f"wrote {out / METRICS}, {out / BEST}, {out / LAST}, "
          + ", ".join(str(p) for p in figures))  # fmt: skip


def cmd_sweep(args: argparse.Namespace) -> None:
    from .results import SWEEP_JSON, sweep_table
    from .sweeps import (
        SWEEP_PNG,
        failure,
        parse_grid,
        parse_seeds,
        parse_shard,
        plan,
        record_plan,
        shard,
        summary_notes,
        train_planned,
        write_summary,
    )

    if args.summarize is not None:
        if args.out is not None or args.grid or args.shard is not None:
            raise ConfigError(
                "--summarize DIR trains nothing: give it without --out, --grid and --shard"
            )
        out = args.summarize
        failed, total = [], 0
    else:
        if args.out is None:
            raise EvaError("sweep needs --out sweeps/NAME (or --summarize DIR)")
        grid = parse_grid(args.grid)
        flagged = [name for name in grid if getattr(args, name) is not None]
        if flagged:
            raise ConfigError(f"--{flagged[0].replace('_', '-')} and --grid {flagged[0]}: give one")
        if args.seeds is not None and args.seed is not None:
            raise ConfigError("give the seeds with --seeds or one with --seed, not both")
        base = config_from_args(args)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [base.seed]
        out = args.out
        index, parts = parse_shard(args.shard) if args.shard is not None else (1, 1)
        runs = plan(base, grid, seeds, out)
        record_plan(runs, out)  # the whole plan: every shard's runs
        part = f" (part {index} of {parts} of a plan of {len(runs)})" if parts > 1 else ""
        runs = shard(runs, index, parts)
        complete = sum(run.complete for run in runs)
        resumed = sum(0 < run.epochs_done < run.config.epochs for run in runs)
        print(
            f"{len(runs)} runs in {out}{part}: {complete} complete, {resumed} to resume, "
            f"{len(runs) - complete - resumed} to start"
        )
        again = "python -m eva_utils " + shlex.join(args.argv)
        failed = train_planned(runs, parallel=args.parallel, progress=not args.quiet, again=again)
        total = len(runs)
    try:
        summary = write_summary(out)
    except RunFileError:
        if failed:  # no run saved an epoch: the failure is the news, not the empty summary
            raise failure(failed, total, summarised=False) from None
        raise
    print(sweep_table(summary))
    for line in summary_notes(summary, out):
        print(line)
    print(f"wrote {out / SWEEP_JSON}, {out / SWEEP_PNG}")
    if failed:
        raise failure(failed, total)


def cmd_plot(args: argparse.Namespace) -> None:
    from .plots import save_history_figures
    from .results import describe_run
    from .runfolder import read_metrics

    check_output_folder(args.out)
    metrics = read_metrics(args.metrics)
    caption = args.caption if args.caption is not None else describe_run(metrics)
    for path in save_history_figures(metrics["history"], args.out, caption):
        print(f"wrote {path}")


def cmd_rf(args: argparse.Namespace) -> None:
    from .receptive_fields import print_receptive_field
    from .recipe import preset_model

    print_receptive_field(preset_model(args.preset))


def cmd_analyze(args: argparse.Namespace) -> None:
    from .analysis import (
        FIGURE_NAMES,
        REPORT_NAME,
        analyze,
        load_report,
        load_test_set,
        load_trained_model,
        save_report,
    )
    from .devices import select_device
    from .plots import save_figure

    device = select_device(args.device)
    out = args.out if args.out is not None else args.run
    # creates nothing: a missing run folder is load_trained_model's to report
    check_output_folder(out)
    run = load_trained_model(args.run)
    test_set = load_test_set(run, args.data)
    report = analyze(
        run, test_set, device=device, erf_images=args.erf_images, progress=not args.quiet
    )
    caption = f"{args.run.name}, best epoch {run.epoch}, {len(test_set):,} test images"
    saved = save_report(report, out / REPORT_NAME, caption)
    # Draw from the saved numbers, as `figures` does, so that it redraws these PNGs byte for byte.
    drawn, caption = load_report(saved)
    paths = [save_figure(fig, out / FIGURE_NAMES[name])
             for name, fig in drawn.with_images(test_set).figures(caption).items()]  # fmt: skip
    worst = int(report.accuracy.nan_to_num(2.0).argmin())
    print(
        f"test accuracy {report.overall_accuracy:.2%} on {len(test_set):,} images "
        f"(epoch {run.epoch}), {len(report.mistakes):,} misclassified; weakest class "
        f"{report.classes[worst]} ({report.accuracy[worst]:.2%})"
    )
    print("wrote " + ", ".join(str(p) for p in [*paths, saved]))


def cmd_figures(args: argparse.Namespace) -> None:
    from .analysis import FIGURE_NAMES, REPORT_NAME, load_report, recorded_test_set
    from .errors import DataError
    from .plots import save_figure, save_history_figures
    from .results import describe_run
    from .runfolder import METRICS, read_metrics

    check_output_folder(args.out)
    metrics = read_metrics(args.results / METRICS)
    paths = save_history_figures(metrics["history"], args.out, describe_run(metrics))
    report_path = args.results / REPORT_NAME
    if report_path.is_file():
        report, caption = load_report(report_path)
        try:
            config = Config.from_dict(metrics.get("config", {}))
            report = report.with_images(recorded_test_set(config, args.data))
        except (ConfigError, DataError) as error:  # the other figures need no data set
            gallery = args.out / FIGURE_NAMES["misclassified"]
            kept = "kept the existing file" if gallery.exists() else "not drawn"
            print(f"{PROG}: skipped {gallery} ({kept}): {error}", file=sys.stderr)
        paths += [save_figure(fig, args.out / FIGURE_NAMES[name])
                  for name, fig in report.figures(caption).items()]  # fmt: skip
    else:
        print(f"no {report_path}: python -m eva_utils analyze runs/NAME writes one")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_compare(args: argparse.Namespace) -> None:
    from .plots import save_figure
    from .results import compare

    png = args.out if args.out.suffix == ".png" else args.out / COMPARISON_PNG
    check_output_file(png)
    figure, table = compare(*args.runs)
    print(table)
    print(f"wrote {save_figure(figure, png)}")


COMMANDS = {
    "summary": cmd_summary, "train": cmd_train, "sweep": cmd_sweep, "plot": cmd_plot, "rf": cmd_rf,
    "analyze": cmd_analyze, "figures": cmd_figures, "compare": cmd_compare,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors a user can fix print one line (exit 2); Ctrl-C and SIGTERM exit
    130, from the first moment on (training prints how to resume what it saved)."""
    debug, command = False, "train"
    for stream in (sys.stdout, sys.stderr):
        # A path the terminal's encoding cannot show (PYTHONIOENCODING=ascii, runs/ünï) is
        # printed escaped: a message must never turn a finished run into a crash.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        with sigterm_as_interrupt(), command_line_words():
            args = build_parser().parse_args(argv)
            args.argv = sys.argv[1:] if argv is None else argv  # to say how to continue
            debug, command = args.debug, args.command
            with signals_deferred():  # a Ctrl-C inside torch's imports leaves it half loaded
                import torch  # noqa: F401
            try:
                COMMANDS[command](args)
            finally:
                if "torch.distributed" in sys.modules:  # joined a torchrun process group
                    from .ranks import leave

                    leave()
    except Interrupted as error:
        if _rank() == 0:  # the main process says what the run folder holds
            print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # training turns it into Interrupted: this came before or without
        if debug:
            raise
        when = (
            " before training started: nothing was saved or changed" if command == "train" else ""
        )
        if _rank() == 0:  # torchrun stops the other ranks when one fails: it says why, not they
            print(f"{PROG}: interrupted{when}", file=sys.stderr)
        return 130
    except EvaError as error:
        if debug:
            raise
        rank = _rank()
        if rank == 0:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        elif not isinstance(error, ConfigError) and not getattr(error, "reported", False):
            # a refusal every rank makes alike, or one the main process printed, is said once
            print(f"{PROG} (rank {rank}): error: {error}", file=sys.stderr)
        return 2
    return 0


def _rank() -> int:
    """This process's rank under torchrun: 0 without it, and where RANK is not a rank of
    WORLD_SIZE (``RANK=1`` exported by hand): that process says why it stopped."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return int(rank) if rank.isdecimal() and world.isdecimal() and int(rank) < int(world) else 0
