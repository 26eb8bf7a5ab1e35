"""Every hyperparameter in one frozen dataclass, and the named presets built from it.

The README's hyperparameter table, the CLI flags and the notebook's parameter cell are all
generated from :class:`Config`, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, option

TARGET_ACCURACY = 0.85  # the assignment's bar, drawn on every accuracy plot
AUGMENTATIONS = ("crop", "flip", "rotate")
SCHEDULES = ("step", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # what each means: eva_utils.precision
LOADERS = ("device", "torchvision")
NORMS = ("bn", "gbn")  # what eva_utils.recipe.norm_layer builds
ARCHITECTURES = ("resnet18", "resnet34", "tiny")  # eva_utils.recipe.NETWORKS
SYNTHETIC = "synthetic"  # the data source of smoke runs: eva_utils.data.synthetic_cifar10


# --- the checks of values, each written once: Config runs them all before any work, and the
# modules that use a value run its check for callers that pass it directly -------------------


def refuse(problem: str | None) -> None:
    """Raise a ConfigError saying ``problem``, if there is one."""
    if problem:
        raise ConfigError(problem)


def positive_int_problem(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{name} must be a positive integer, got {value!r}"
    return None


def choice_problem(name: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    listed = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
    return f"{name} must be {listed}, got {value!r}"


def fraction_problem(name: str, value: float) -> str | None:
    """A fraction in [0, 1): a dropout or label smoothing probability."""
    return None if 0.0 <= value < 1.0 else f"{name} must be in [0, 1), got {value}"


def ghost_batch_problem(num_splits: int, batch: int, described: str | None = None) -> str | None:
    """Each ghost batch needs at least one image of the ``batch`` (``described``: how the
    message names it, default ``batch_size (N)``)."""
    if 1 <= batch < num_splits:
        return (
            f"num_splits ({num_splits}) is larger than {described or f'batch_size ({batch})'}: "
            "each ghost batch needs at least one image"
        )
    return None


# What a field is, for the lists of fields below: a hyperparameter of the training recipe (the
# README's table, the labels of compared runs), a data size (labels too), or a field that a
# resumed run may change.
HYPERPARAMETER, DATA_SIZE, RESUMABLE = "hyperparameter", "data size", "resumable"


def _knob(default: Any, help: str, *kinds: str) -> Any:
    return field(default=default, metadata={"help": help, "kinds": kinds})


@dataclass(frozen=True)
class Config:
    """One training run. The defaults are the assignment's recipe (the ``session8`` preset)."""

    # model
    # also "tiny" (eva_utils.model.resnet_tiny), which the mechanics tests train: not a recipe
    arch: str = _knob(
        "resnet18", "architecture: resnet18 or resnet34 (pytorch-cifar)", HYPERPARAMETER
    )
    norm: str = _knob(
        "gbn", "norm layer: gbn (Ghost BatchNorm) or bn (BatchNorm2d)", HYPERPARAMETER
    )
    num_splits: int = _knob(2, "ghost batches per batch (gbn only)", HYPERPARAMETER)
    dropout: float = _knob(
        0.10, "dropout between the two convolutions of each block", HYPERPARAMETER
    )
    # optimisation
    epochs: int = _knob(30, "training epochs", HYPERPARAMETER, RESUMABLE)
    batch_size: int = _knob(128, "images per training batch", HYPERPARAMETER)
    lr: float = _knob(0.016, "SGD learning rate (the peak rate for onecycle)", HYPERPARAMETER)
    momentum: float = _knob(0.9, "SGD momentum", HYPERPARAMETER)
    nesterov: bool = _knob(False, "Nesterov momentum", HYPERPARAMETER)
    weight_decay: float = _knob(5e-4, "L2 weight decay", HYPERPARAMETER)
    decay_norm_bias: bool = _knob(
        True, "apply weight decay to norm weights and biases too", HYPERPARAMETER
    )
    label_smoothing: float = _knob(0.0, "cross-entropy label smoothing", HYPERPARAMETER)
    schedule: str = _knob(
        "step", "lr schedule: step (StepLR, per epoch) or onecycle (per step)", HYPERPARAMETER
    )
    step_size: int = _knob(2, "StepLR: epochs between lr drops", HYPERPARAMETER)
    gamma: float = _knob(0.92, "StepLR: lr multiplier at each drop", HYPERPARAMETER)
    warmup: float = _knob(0.25, "onecycle: fraction of training spent warming up", HYPERPARAMETER)
    # data
    augment: tuple[str, ...] = _knob(
        ("crop", "flip", "rotate"),
        "training augmentation: crop (32, pad 4), flip, rotate",
        HYPERPARAMETER,
    )
    rotate_degrees: float = _knob(
        8.0, "rotate: largest rotation, in degrees either way", HYPERPARAMETER
    )
    tta_flip: bool = _knob(
        False, "test-time augmentation: average with the flipped image", HYPERPARAMETER
    )
    data: str | None = _knob(
        None, "data: none = download CIFAR-10 to ./data; a folder or .tar.gz; 'synthetic'"
    )
    train_size: int | None = _knob(None, "class-balanced training subset (none: all)", DATA_SIZE)
    test_size: int | None = _knob(None, "class-balanced test subset (none: all)", DATA_SIZE)
    val_size: int | None = _knob(
        None, "class-balanced validation split (none: no split)", DATA_SIZE
    )
    # run
    seed: int = _knob(1, "seed for weights, subsets, shuffling and augmentation", HYPERPARAMETER)
    device: str = _knob("auto", "auto (cuda, then mps, then cpu), or a torch device", RESUMABLE)
    loader: str = _knob("device", "device (batches built on the device) or torchvision (PIL)")
    channels_last: bool = _knob(True, "channels_last memory format")
    precision: str = _knob(
        "auto",
        "auto (bf16 where native, fp16 + gradient scaler on CUDA 7.x, else fp32), bf16, fp16, fp32",
        HYPERPARAMETER,
    )
    compile: bool = _knob(False, "torch.compile the model", RESUMABLE)
    num_workers: int = _knob(2, "DataLoader workers (torchvision loader only)", RESUMABLE)
    max_batches: int | None = _knob(None, "dry run: stop each epoch after this many batches")

    def __post_init__(self) -> None:
        # Tuples arrive as lists from JSON and the CLI. The loaders apply crop, flip, rotate in
        # that order whatever the order given, so one order stands for them all: one recipe.
        # A notebook's augment="crop" or "crop,flip" means the names, not the letters.
        augment = self.augment.split(",") if isinstance(self.augment, str) else self.augment
        given = tuple(name.strip() for name in augment if name.strip())
        if isinstance(self.data, os.PathLike):  # data=Path("...") is the path's text
            object.__setattr__(self, "data", os.fspath(self.data))
        canonical = (
            *[a for a in AUGMENTATIONS if a in given],
            *[a for a in given if a not in AUGMENTATIONS],
        )
        object.__setattr__(self, "augment", canonical)
        problems = [problem for problem in self._problems() if problem]
        if problems:
            raise ConfigError("; ".join(problems))

    def _problems(self):
        for name in ("epochs", "batch_size", "num_splits", "step_size"):
            yield positive_int_problem(name, getattr(self, name))
        for name in ("train_size", "test_size", "val_size", "max_batches"):
            if getattr(self, name) is not None:
                yield positive_int_problem(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            yield f"seed must be a whole number, got {self.seed!r}"
        elif not -(2**63) <= self.seed < 2**63:  # what torch's generators take
            yield f"seed must be a whole number from -2**63 to 2**63 - 1, got {self.seed}"
        if self.data is not None and not isinstance(self.data, str):
            yield (
                f"data must be the path of a folder or .tar.gz (text), '{SYNTHETIC}' or none, "
                f"got {self.data!r}"
            )
        if not 0.0 < self.lr < float("inf"):  # also refuses NaN
            yield f"lr must be a positive number, got {self.lr}"
        for name in ("momentum", "weight_decay", "rotate_degrees", "num_workers"):
            if not getattr(self, name) >= 0:
                yield f"{name} must be zero or positive, got {getattr(self, name)}"
        if self.nesterov and not self.momentum > 0:
            yield "nesterov needs a positive momentum"
        if not 0.0 < self.gamma < float("inf"):
            yield f"gamma must be a positive number, got {self.gamma}"
        if not 0.0 < self.warmup < 1.0:
            yield f"warmup must be a fraction in (0, 1), got {self.warmup}"
        if self.norm == "gbn":
            yield ghost_batch_problem(self.num_splits, self.batch_size)
        yield choice_problem("norm", self.norm, NORMS)
        yield choice_problem("arch", self.arch, ARCHITECTURES)
        yield choice_problem("schedule", self.schedule, SCHEDULES)
        yield choice_problem("precision", self.precision, PRECISIONS)
        yield choice_problem("loader", self.loader, LOADERS)
        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            yield f"unknown augmentation {sorted(unknown)}: choose from {', '.join(AUGMENTATIONS)}"
        yield fraction_problem("dropout", self.dropout)
        yield fraction_problem("label_smoothing", self.label_smoothing)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: list(v) if isinstance(v, tuple) else v for name, v in self.items()}

    def items(self):
        return ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """The config a ``to_dict()`` recorded, also one recorded before ``precision`` replaced
        the ``amp`` switch."""
        return cls().replace(**upgrade_config_dict(values))


# --- the lists of fields, from the kinds each field declares above ------------------------------


def _fields_of_kind(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config) if kind in f.metadata["kinds"])


# The training recipe's hyperparameters: the README's tables, and what labels of runs name.
HYPERPARAMETERS = _fields_of_kind(HYPERPARAMETER)
# The fields a resumed run may change: where and how fast it computes (device, compiled kernels,
# DataLoader workers) and how long it goes on (epochs; a onecycle schedule is fixed at the start,
# so a onecycle run still refuses a new length).
RESUMABLE_CHANGES = _fields_of_kind(RESUMABLE)
# A run's recipe: every other field, since each changes what is computed (the model, the data,
# the optimisation, the random streams). A run keeps its recipe: a resume refuses a new value,
# and two recipes never share a run folder (recipe_name).
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE_CHANGES)
# What sets compared runs apart in their labels: the hyperparameters and the data sizes.
LABEL_FIELDS = (*HYPERPARAMETERS, *_fields_of_kind(DATA_SIZE))
# What a sweep's grid may vary: the labelled fields of the recipe, but the seeds (--seeds).
GRID_FIELDS = tuple(name for name in LABEL_FIELDS if name in RECIPE_FIELDS and name != "seed")


def upgrade_config_dict(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with today's field names: ``amp`` (a switch until ``precision``
    replaced it) becomes ``precision`` auto (amp on) or fp32 (amp off)."""
    if "amp" not in values:
        return values
    upgraded = {k: v for k, v in values.items() if k != "amp"}
    upgraded.setdefault("precision", "auto" if values["amp"] else "fp32")
    return upgraded


SWITCH_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
# What the text of each kind of field may be, for the error that refuses other text.
ACCEPTS = {
    int: "a whole number",
    int | None: "a whole number or none",
    float: "a number",
    bool: "true or false (or 1/0, yes/no)",
}


def parse_field(name: str, text: str, source: str | None = None) -> Any:
    """A Config field's value from text, as CLI flags and ``EVA_<FIELD>`` variables give it:
    "none" for an optional field, a comma list for ``augment``, true/false for a switch.
    Other text is a ConfigError naming ``source`` (default: the field) and what it accepts."""
    kind = typing.get_type_hints(Config)[name]
    if kind in (int | None, str | None) and text.lower() == "none":
        return None
    if kind == tuple[str, ...]:
        return tuple(part for part in text.split(",") if part and part != "none")
    try:
        if kind is bool:
            return SWITCH_WORDS[text.strip().lower()]  # a typo ("flase") must not mean False
        if kind in (int, int | None):
            return int(text)  # refuses "1e3" and "1.0": a count is never rounded silently
        if kind is float:
            return float(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{source or name} must be {ACCEPTS[kind]}, got {text!r}") from None
    return text


def _field_type(name: str):
    def parse(text: str):
        return parse_field(name, text)

    parse.__name__ = name  # argparse says "invalid <name> value: ..."
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (``--train-size``, ``--no-channels-last``...), default: the
    preset's."""
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("hyperparameters (default: the preset's value)")
    for knob in dataclasses.fields(Config):
        flag = "--" + knob.name.replace("_", "-")
        kind = hints[knob.name]
        options: dict = {"default": None, "help": knob.metadata["help"], "dest": knob.name}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            metavar = {"augment": "LIST", "data": "PATH"}.get(knob.name)
            if metavar is None:
                metavar = "N" if kind == int | None else knob.name.upper().replace("_", "-")
            options.update(type=_field_type(knob.name), metavar=metavar)
        group.add_argument(flag, **options)


def field_flags(config: Config, names: Collection[str] | None = None) -> list[str]:
    """The command-line flags that give every field of ``config`` (or the fields ``names``)
    whatever the preset, as :func:`parse_field` reads them: ``--train-size none``,
    ``--no-amp``, ``--augment a,b``."""
    flags = []
    for name, value in config.items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            flags += [flag, ",".join(value) or "none"]
        else:
            flags += [flag, "none" if value is None else str(value)]
    return flags


PRESETS: dict[str, Config] = {
    # The assignment's recipe, with GBN and dropout really in the model.
    "session8": Config(),
    # Few-epoch recipe for the same ResNet18; the schedule stretches to --epochs.
    "fast": Config(
        norm="bn",  # GBN's extra noise helps little in 30 epochs and costs a second BN pass
        dropout=0.0,  # label smoothing and augmentation regularise enough for a short run
        batch_size=512,  # fewer, larger steps: better device utilisation
        lr=0.4,  # linear scaling of the classic 0.1 at batch 128
        nesterov=True,  # slightly faster convergence than heavy-ball momentum
        decay_norm_bias=False,  # decaying norm scales and biases only fights normalisation
        label_smoothing=0.1,  # softer targets: better calibrated, a little more accurate
        schedule="onecycle",  # warm-up then annealing: the fastest reliable schedule for SGD
        warmup=0.2,  # a short warm-up keeps the large peak rate stable
        augment=("crop", "flip"),  # rotation costs time and barely helps at 32x32
        tta_flip=True,  # free accuracy at test time
    ),
}


def get_preset(name: str) -> Config:
    """The named preset; unknown names raise a ConfigError that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def preset_name(config: Config, world_size: int = 1) -> str | None:
    """The preset whose recipe ``config`` trains on ``world_size`` ranks (any length, any
    seed), or None. Each rank normalises its own slice of the batch, so the norm layer counts
    by its ghost batches: session8's 2 splits are 1 split (or BatchNorm) on each of 2 ranks."""
    compared = [name for name in HYPERPARAMETERS if name not in ("epochs", "seed", "norm",
                                                                   "num_splits")]  # fmt: skip
    # how many BatchNorms each global batch is normalised by: GBN's splits on each rank
    ghost_batches = lambda c, ranks=1: ranks * (c.num_splits if c.norm == "gbn" else 1)  # noqa: E731
    return next(
        (name for name, preset in PRESETS.items()
         if all(getattr(config, f) == getattr(preset, f) for f in compared)
         and ghost_batches(config, world_size) == ghost_batches(preset)),
        None,
    )  # fmt: skip


def hyperparameter_table(config: Config, fields: tuple[str, ...] | None = None) -> str:
    """A Markdown table of the config's hyperparameters (every field unless ``fields`` is given)."""
    chosen = [f for f in dataclasses.fields(config) if fields is None or f.name in fields]
    rows = ["| hyperparameter | value | meaning |", "|---|---|---|"]
    for f in chosen:
        value = getattr(config, f.name)
        shown = ", ".join(value) if isinstance(value, tuple) else value
        rows.append(f"| `{f.name}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)


# --- the data a run trains on: recorded by where it is, told apart by what it is ---------------


def data_source(data: str | None) -> str | None:
    """``data`` as a run records it: a path that exists made absolute (links followed), so that
    the run finds its data again from any working folder; none, synthetic and a path that is
    not there as they are (the error that refuses it names it as typed)."""
    if data is None or data == SYNTHETIC or not Path(data).expanduser().exists():
        return data
    return str(Path(data).expanduser().resolve())


def data_identity(data: str | None) -> str | None:
    """What ``data`` is, for telling recipes apart: an archive by its size in bytes (the same
    archive in another folder, or reached by another path, is the same data), a folder (or a
    path that is not there) by its absolute path; none and synthetic as they are."""
    if data is None or data == SYNTHETIC:
        return data
    source = str(Path(data).expanduser().resolve())
    try:
        if Path(source).is_file():
            return f"an archive of {Path(source).stat().st_size} bytes"
    except OSError:
        pass
    return source


def same_data(recorded: str | None, given: str | None) -> bool:
    """Whether ``given`` names the data that a run recorded as ``recorded``."""
    return recorded == given or data_identity(recorded) == data_identity(given)


def recipe_name(config: Config, *, data_as_typed: bool = False) -> str:
    """A run folder name for ``config``'s recipe (:data:`RECIPE_FIELDS`): readable, and
    different for every recipe, so that two recipes never share a folder. The data counts by
    what it is (:func:`data_identity`), so the same archive from another folder gives the same
    name; ``data_as_typed`` gives the name that versions before that gave (the path's text)."""
    recipe = {k: v for k, v in config.to_dict().items() if k in RECIPE_FIELDS}
    if config.val_size is None:  # the names of runs from before val_size existed stay
        del recipe["val_size"]
    if not data_as_typed:
        recipe["data"] = data_identity(config.data)
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    norm = f"gbn{config.num_splits}" if config.norm == "gbn" else "bn"
    images = f"{config.train_size}img" if config.train_size else "all"
    return f"{norm}-dropout{config.dropout:g}-{images}-{digest}"


def divergence_advice(config: Config) -> str:
    """What to change when ``config``'s training diverged. Weight decay alone multiplies each
    weight by about (1 - lr * weight_decay) per step, which with momentum m oscillates and grows
    once lr * weight_decay exceeds 2 * (1 + m): then the decay, not the step size, is at fault."""
    shrink = config.lr * config.weight_decay
    if shrink >= 2 * (1 + config.momentum):
        return (
            f"lr x weight_decay = {shrink:g} is above {2 * (1 + config.momentum):g}, where weight "
            f"decay alone makes the weights grow at every step: lower {option('weight_decay')} "
            f"(or {option('lr')})"
        )
    return (
        f"lower the learning rate ({option('lr')}), or the weight decay "
        f"({option('weight_decay')}) if you raised it"
    )
