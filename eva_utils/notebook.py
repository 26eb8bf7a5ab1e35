"""Small helpers that keep the notebooks thin: Colab detection, parameters, run folders, the
reference run and example batches.

The notebooks' parameter cells hold the values a student edits. Two environment variables
override them without editing the notebook: ``EVA_SMOKE=1`` (a tiny synthetic run for CI) and
``EVA_<NAME>`` for any Config field (``EVA_EPOCHS=10``), used to record the stored outputs;
every override is printed, so the outputs say what produced them.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import os
import shutil
import tempfile
import typing
from pathlib import Path

import torch
from torch import Tensor

from . import analysis, pretrained
from .colab import (
    DRIVE_MOUNT_ENV,
    KAGGLE_GPU_ADVICE,
    in_colab,
    in_kaggle,
    kaggle_data,
    runs_on_drive,
)
from .config import Config, get_preset, parse_field, preset_name, recipe_name
from .data import CIFAR10_CLASSES, SYNTHETIC, ImageSet, load_datasets
from .devices import describe, select_device
from .errors import ConfigError, DataError, EvaError
from .files import make_scratch_folder, remove_dead_scratch
from .loaders import DeviceLoader
from .precision import choose_precision, emulation_note
from .results import (
    RecordedRun,
    describe_data,
    read_recorded_run,
    summarize_history,
    target_reached,
)
from .runfolder import BEST, METRICS, holds_run

SMOKE_ENV = "EVA_SMOKE"
RUN_DIR_ENV = "EVA_RUN_DIR"
OVERRIDE_PREFIX = "EVA_"
# A run that exercises every cell in seconds on a CPU, with no data set and no network.
SMOKE = {"epochs": 1, "data": "synthetic", "train_size": 128, "test_size": 64, "device": "cpu"}
COLAB_GPU_ADVICE = (
    "WARNING: this Colab runtime has no GPU, training will be very slow. Choose "
    "Runtime > Change runtime type > T4 GPU (or better), then Runtime > Run all."
)


def smoke_mode() -> bool:
    return os.environ.get(SMOKE_ENV) == "1"


def device_report(
    name: str = "auto", precision: str = "auto", channels_last: bool = True, advice: bool = True
) -> str:
    """'Device: ...' with the GPU (and its compute capability) or CPU name and the precision
    training will use; with ``advice``, what to do when Colab or Kaggle runs without a GPU."""
    device = select_device(name)
    report = f"Device: {describe(device, choose_precision(device, precision, channels_last))}"
    if not advice:
        return report
    if slow := emulation_note(device, precision):
        report += "\n" + slow
    if device.type != "cuda" and (in_colab() or in_kaggle()):
        report += "\n" + (COLAB_GPU_ADVICE if in_colab() else KAGGLE_GPU_ADVICE)
    return report


# The lesson's short run: on a GPU 10 epochs of all the data (about 5 minutes on a T4 is an
# estimate, not yet measured); on a CPU 3 epochs of 5,000 images (make notebook-outputs: 124 s
# an epoch on the 2-core AVX512-BF16 Xeon, other work beside it).
LESSON_GPU = {"epochs": 10, "train_size": None, "test_size": None}
LESSON_CPU = {"epochs": 3, "train_size": 5000, "test_size": 1000}
ASSIGNMENT = {"epochs": 30, "train_size": None, "test_size": None}


def run_size(lesson: bool = True, device: str = "auto") -> dict[str, int | None]:
    """The parameter cell's ``LESSON``: epochs and data sizes for a lesson-sized run on the
    device that will train, or (``lesson=False``) the assignment's 30 epochs of everything."""
    if not lesson:
        return dict(ASSIGNMENT)
    return dict(LESSON_CPU if select_device(device).type == "cpu" else LESSON_GPU)


def notebook_config(preset: str = "session8", **values: typing.Any) -> Config:
    """The preset with the parameter cell's ``values``, then any environment overrides."""
    for name, value in values.items():
        check_type(name, value)
    if "data" in values and values["data"] is None and in_kaggle():
        values["data"] = _kaggle_input()
    config = get_preset(preset).replace(**values)
    variables = _override_variables()
    overrides = {name: parse_field(name, os.environ[v], source=v) for v, name in variables.items()}
    if smoke_mode():
        overrides.update(SMOKE)
        print(f"{SMOKE_ENV}=1: a smoke run on synthetic data, not a real result")
    for name, value in overrides.items():
        print(f"override: {name} = {value!r} (the cell says {getattr(config, name)!r})")
    try:
        return config.replace(**overrides)
    except ConfigError as error:
        if not variables:
            raise
        given = ", ".join(f"{v}={os.environ[v]}" for v in variables)
        raise ConfigError(f"{error} (the environment sets {given})") from None


def _kaggle_input() -> str | None:
    """On Kaggle, ``DATA = None`` means a CIFAR-10 added as the notebook's input, if any."""
    found = kaggle_data()
    if found is None:
        print("Kaggle: no CIFAR-10 among this notebook's inputs, so it downloads (Internet on)")
        return None
    print(f"Kaggle: CIFAR-10 from this notebook's input {found}")
    return str(found)


_KINDS = {int: "a whole number", float: "a number", bool: "True or False", str: "text",
          type(None): "None"}  # fmt: skip


def check_type(name: str, value: typing.Any) -> None:
    """Refuse, in one line, a parameter-cell value of the wrong type for the Config field
    ``name`` (``epochs='3'``, ``epochs=3.5``, ``nesterov='False'``, ``dropout=None``): Python
    types, not text to parse. An int is a number; a bool is no number; unknown names are left to
    ``Config.replace``."""
    hints = typing.get_type_hints(Config)
    if name not in hints:
        return
    allowed = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is not tuple else ()
    allowed = [kind for kind in allowed or (hints[name],) if kind in _KINDS]
    if not allowed:  # augment: a tuple of names, checked by Config
        return

    def fits(kind: type) -> bool:
        if kind is float:
            return isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, kind)

    if not any(fits(kind) for kind in allowed):
        wanted = " or ".join(_KINDS[kind] for kind in allowed)
        default = getattr(Config(), name)
        raise ConfigError(
            f"{name}={value!r}: give {wanted} (a Python value, not text), e.g. {name}={default!r}"
        )


def _override_variables() -> dict[str, str]:
    """The ``EVA_<FIELD>`` variables that are set, with their fields. Any other ``EVA_``
    variable but the notebook's own (EVA_SMOKE...) is a ConfigError: a misspelt override
    (``EVA_EPOCH``) would otherwise be ignored without a word."""
    fields = {f"{OVERRIDE_PREFIX}{f.name.upper()}": f.name for f in dataclasses.fields(Config)}
    own = {SMOKE_ENV, RUN_DIR_ENV, REFERENCE_ENV, pretrained.URL_ENV, DRIVE_MOUNT_ENV}
    for variable in sorted(os.environ):
        if variable.startswith(OVERRIDE_PREFIX) and variable not in {*fields, *own}:
            close = difflib.get_close_matches(variable, [*fields, *own], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{variable} names no Config field ({hint}rename or unset it): EVA_<FIELD> "
                f"overrides a field, and {', '.join(sorted(own))} are the notebook's own"
            )
    return {variable: name for variable, name in fields.items() if variable in os.environ}


SMOKE_PREFIX = "eva8-smoke-"


def run_folder(parent: str, config: Config, *, keep_on_drive: bool = False) -> Path:
    """The run folder of ``config``'s recipe under ``parent``, on Google Drive with
    ``keep_on_drive`` in Colab (:func:`eva_utils.colab.runs_on_drive`); ``EVA_RUN_DIR``
    overrides the folder itself. In smoke mode, a temporary folder deleted when the kernel
    exits."""
    if smoke_mode():
        remove_stale_smoke_folders()
        folder = make_scratch_folder(tempfile.gettempdir(), SMOKE_PREFIX)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    if os.environ.get(RUN_DIR_ENV):  # set but empty is unset, not the current folder
        folder = Path(os.environ[RUN_DIR_ENV])
        print(f"override: run folder = {str(folder)!r}")
    else:
        folder = (runs_on_drive(parent) if keep_on_drive else Path(parent)) / recipe_name(config)
    print(f"run folder: {folder} (one folder per recipe: a changed recipe trains in a new one)")
    return folder


def remove_stale_smoke_folders() -> None:
    """Delete the smoke folders of kernels that died without their exit handler running."""
    remove_dead_scratch(Path(tempfile.gettempdir()), SMOKE_PREFIX)


def can_resume(folder: str | Path) -> bool:
    """Whether ``folder`` holds a checkpoint to continue (after a disconnect, say)."""
    found = holds_run(folder)
    if found:
        print(f"{folder} holds a checkpoint: continuing that run (delete the folder to restart)")
    return found


# --- the reference run -------------------------------------------------------------------------

REFERENCE = "session8-h100"  # results/<name>: the recorded full-length session8 run
REFERENCE_ENV = "EVA_REFERENCE_RUN"  # a folder holding the reference run's best.pt


def _search_roots() -> list[Path]:
    """Where a clone of the repository may be: the package's parent (an editable install or a
    checkout) and the working folder and its parents (a notebook runs in notebooks/)."""
    here = Path.cwd().resolve()
    return list(dict.fromkeys([Path(__file__).resolve().parents[1], here, *here.parents]))


def reference_run(name: str = REFERENCE) -> RecordedRun:
    """The recorded run ``results/<name>`` of the repository (a clone has it, Colab included)."""
    for root in _search_roots():
        if (root / "results" / name / METRICS).is_file():
            return read_recorded_run(root / "results" / name)
    raise EvaError(
        f"results/{name} not found: run the notebook from a clone of the repository "
        "(Colab's setup cell makes one)"
    )


def reference_checkpoint() -> Path | None:
    """The folder of the reference run's trained model (``best.pt``), if this machine has it:
    ``$EVA_REFERENCE_RUN``, else ``runs/session8-h100`` in the clone (a downloaded copy, or
    your own full run), else ``../shared/reference-runs/session8-h100`` beside the clone, else
    the published model downloaded into torch.hub's cache (not in smoke mode: no network).
    A failed download is said in one line and gives None."""
    if os.environ.get(REFERENCE_ENV):  # as EVA_RUN_DIR: empty is unset
        candidates = [Path(os.environ[REFERENCE_ENV])]
        if not (candidates[0] / BEST).is_file():
            what = "holds no" if candidates[0].is_dir() else "does not exist, so no"
            then = "no reference model in smoke mode" if smoke_mode() else "downloading it"
            print(f"{REFERENCE_ENV}={candidates[0]} {what} {BEST}: {then} (fix or unset it)")
    else:
        candidates = [
            folder
            for root in _search_roots()
            for folder in (root / "runs" / REFERENCE,
                           root.parent / "shared" / "reference-runs" / REFERENCE)
        ]  # fmt: skip
    local = next((c for c in candidates if (c / BEST).is_file()), None)
    if local is not None or smoke_mode():
        return local
    try:
        return pretrained.download()
    except EvaError as error:
        print(error)
        return None


def trained_or_untrained(run: str | Path | None = None) -> analysis.TrainedModel:
    """``run``'s best model if given; else the reference run's trained model where this machine
    has it, else an untrained session8 ResNet18. Prints which it is."""
    if run is not None:
        trained = analysis.load_trained_model(run)
        print(f"model: the best epoch ({trained.epoch}) of {run}")
        return trained
    trained = reference_model()
    if trained is not None:
        return trained
    print(
        "model: an UNTRAINED session8 ResNet18 (no trained reference model on this machine: "
        f"set {REFERENCE_ENV} to a folder holding its best.pt, or train one into "
        f"runs/{REFERENCE}); its figures show what training starts from"
    )
    return analysis.untrained_model(get_preset("session8"), CIFAR10_CLASSES)


def reference_model() -> analysis.TrainedModel | None:
    """The reference run's trained model where this machine has it (:func:`reference_checkpoint`),
    described from its own record; None if it has none, or if its best.pt cannot be read (said
    in one line, with what to do)."""
    folder = reference_checkpoint()
    if folder is None:
        return None
    try:
        trained = analysis.load_trained_model(folder)
    except EvaError as error:  # a copy cut short, say: the notebook goes on without it
        then = "" if smoke_mode() else " (without it, the published model is downloaded)"
        print(f"{error}: delete it, or copy a whole {BEST} there{then}")
        return None
    print(f"model: the reference run's trained {_described(trained)}")
    return trained


def _described(trained: analysis.TrainedModel) -> str:
    """'ResNet18 (FOLDER: RECIPE, N epochs on HARDWARE; best epoch E, ACC)', from the run's own
    record: the metrics.json beside its best.pt, or, for the download, the published run's
    results/session8-h100; a best.pt alone gives its planned epochs."""
    config, folder, record = trained.config, Path(trained.folder), None
    name = folder.name
    if (folder / METRICS).is_file():
        record = read_recorded_run(folder)
    elif folder == pretrained.cache_folder():  # the published run's best.pt, checked by sha256
        with contextlib.suppress(EvaError):
            record = reference_run()
        name = f"the published model of results/{REFERENCE}"
    if record is not None:
        trained_for = f"{len(record.history)} epochs on {record.hardware}"
    else:
        trained_for = f"{config.epochs} epochs planned, on hardware it does not record"
    ranks = record.world_size if record is not None else 1
    recipe = f"{preset_name(config, ranks) or 'its own'} recipe"
    return (
        f"{config.arch.replace('resnet', 'ResNet')} ({name}: {recipe}, {trained_for}; best epoch "
        f"{trained.epoch}, {trained.test_acc:.2%})"
    )


def gallery_model(own_run: str | Path, config: Config) -> analysis.TrainedModel:
    """The model whose mistakes the main notebook shows: the trained reference model where this
    machine has it and the data is real CIFAR-10, else the notebook's own run. Prints which."""
    reference = reference_model() if config.data != SYNTHETIC else None
    if reference is not None:
        return reference
    own = trained_or_untrained(own_run)
    print(
        f"not the trained reference model: a run of {config.epochs} epoch(s) on "
        f"{config.train_size or 'all the'} training images, so expect mistakes a trained "
        "network would not make, between classes that look nothing alike"
    )
    return own


def analysis_test_set(
    run: analysis.TrainedModel, data: str | None = None, test_size: int | None = None
) -> ImageSet:
    """The test images to analyse ``run`` on: ``data`` if given, else the run's own source
    (found beside the clone when the run recorded a relative path), else CIFAR-10's download;
    smoke mode and a failed load fall back to synthetic images. Prints which."""
    if smoke_mode():
        data, test_size = SYNTHETIC, 64
    elif data is None:
        data = _locate(run.config.data)
    config = run.config.replace(data=data, test_size=test_size)
    try:
        test_set = load_datasets(config)[1]
    except DataError as error:
        print(f"could not load the test images ({error}): using synthetic images instead")
        config = config.replace(data=SYNTHETIC, test_size=64)
        test_set = load_datasets(config)[1]
    source, _ = describe_data(config.to_dict())  # the file's name: no path of this machine
    print(f"test images: {len(test_set):,} from {source}")
    return test_set


def _locate(path: str | None) -> str | None:
    """A run's recorded data path as seen from here: a relative one was relative to the clone's
    root, where the command ran. None (CIFAR-10's download) if it is nowhere to be found."""
    if path in (None, SYNTHETIC) or Path(path).exists():
        return path
    if Path(path).is_absolute():
        return None
    return next((str(root / path) for root in _search_roots() if (root / path).exists()), None)


def compare_with_reference(history: list[dict], config: Config, reference: RecordedRun) -> str:
    """How a run (its history and config) compares with the reference run, epoch for epoch."""
    mine, ref = summarize_history(history), reference.summary()
    last = min(mine["epochs"], ref["epochs"])
    ref_then = reference.history[last - 1]["test_acc"]
    reached, ref_reached = target_reached(mine), target_reached(ref)
    return "\n".join([
        f"this run:      best {mine['best_acc']:.2%} (epoch {mine['best_epoch']}), final "
        f"{mine['final_acc']:.2%} after {mine['epochs']} epochs; {mine['target']:.0%}: {reached}",
        f"reference run: best {ref['best_acc']:.2%} (epoch {ref['best_epoch']}), final "
        f"{ref['final_acc']:.2%} after {ref['epochs']} epochs; {ref['target']:.0%}: {ref_reached} "
        f"({reference.name}, {reference.hardware})",
        f"at epoch {last}: this run {history[last - 1]['test_acc']:.2%}, the reference "
        f"{ref_then:.2%} ({100 * (history[last - 1]['test_acc'] - ref_then):+.2f} points; "
        f"train/test images: the reference {describe_data(reference.config)[1]}, this run "
        f"{describe_data(config.to_dict())[1]})",
    ])  # fmt: skip


def augmented_examples(dataset: ImageSet, config: Config, count: int = 32) -> tuple[Tensor, Tensor]:
    """The first ``count`` training images after the config's augmentation (normalised)."""
    examples = dataset.subset(torch.arange(min(count, len(dataset))))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DeviceLoader(examples, count, augment=config.augment,
                          rotate_degrees=config.rotate_degrees, generator=generator)  # fmt: skip
    return next(iter(loader))


def history_table(history: list[dict]) -> str:
    """The history as an aligned text table, accuracies in percent."""
    lines = [" epoch  train loss  train acc  test loss  test acc        lr  seconds"]
    for row in history:
        lines.append(
            f"{row['epoch']:>6}  {row['train_loss']:>10.4f}  {row['train_acc']:>9.2%}  "
            f"{row['test_loss']:>9.4f}  {row['test_acc']:>8.2%}  {row['lr']:>8.5f}  "
            f"{row['seconds']:>7.1f}"
        )
    return "\n".join(lines)
