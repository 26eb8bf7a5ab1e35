"""Every hyperparameter in one frozen dataclass, and the named presets built from it.

The README's hyperparameter table, the CLI flags and the notebook's parameter cell are all
generated from :class:`Config`, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

TARGET_ACCURACY = 0.85  # the assignment's bar, drawn on every accuracy plot
AUGMENTATIONS = ("crop", "flip", "rotate")
SCHEDULES = ("step", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # what each means: eva_utils.precision
LOADERS = ("device", "torchvision")


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    """One training run. The defaults are the assignment's recipe (the ``session8`` preset)."""

    # model
    arch: str = _knob("resnet18", "architecture: resnet18 or resnet34 (pytorch-cifar)")
    norm: str = _knob("gbn", "norm layer: gbn (Ghost BatchNorm) or bn (BatchNorm2d)")
    num_splits: int = _knob(2, "ghost batches per batch (gbn only)")
    dropout: float = _knob(0.10, "dropout between the two convolutions of each block")
    # optimisation
    epochs: int = _knob(30, "training epochs")
    batch_size: int = _knob(128, "images per training batch")
    lr: float = _knob(0.016, "SGD learning rate (the peak rate for onecycle)")
    momentum: float = _knob(0.9, "SGD momentum")
    nesterov: bool = _knob(False, "Nesterov momentum")
    weight_decay: float = _knob(5e-4, "L2 weight decay")
    decay_norm_bias: bool = _knob(True, "apply weight decay to norm weights and biases too")
    label_smoothing: float = _knob(0.0, "cross-entropy label smoothing")
    schedule: str = _knob("step", "lr schedule: step (StepLR, per epoch) or onecycle (per step)")
    step_size: int = _knob(2, "StepLR: epochs between lr drops")
    gamma: float = _knob(0.92, "StepLR: lr multiplier at each drop")
    warmup: float = _knob(0.25, "onecycle: fraction of training spent warming up")
    # data
    augment: tuple[str, ...] = _knob(
        ("crop", "flip", "rotate"), "training augmentation: crop (32, pad 4), flip, rotate"
    )
    rotate_degrees: float = _knob(8.0, "rotate: largest rotation, in degrees either way")
    tta_flip: bool = _knob(False, "test-time augmentation: average with the flipped image")
    data: str | None = _knob(
        None, "data: none = download CIFAR-10 to ./data; a folder or .tar.gz; 'synthetic'"
    )
    train_size: int | None = _knob(None, "class-balanced training subset (none: all)")
    test_size: int | None = _knob(None, "class-balanced test subset (none: all)")
    # run
    seed: int = _knob(1, "seed for weights, subsets, shuffling and augmentation")
    device: str = _knob("auto", "auto (cuda, then mps, then cpu), or a torch device")
    loader: str = _knob("device", "device (batches built on the device) or torchvision (PIL)")
    channels_last: bool = _knob(True, "channels_last memory format")
    precision: str = _knob(
        "auto",
        "auto (bf16 where native, fp16 + gradient scaler on CUDA 7.x, else fp32), bf16, fp16, fp32",
    )
    compile: bool = _knob(False, "torch.compile the model")
    num_workers: int = _knob(2, "DataLoader workers (torchvision loader only)")
    max_batches: int | None = _knob(None, "dry run: stop each epoch after this many batches")

    def __post_init__(self) -> None:
        # Tuples arrive as lists from JSON and the CLI.
        object.__setattr__(self, "augment", tuple(self.augment))
        problems = list(self._problems())
        if problems:
            raise ConfigError("; ".join(problems))

    def _problems(self):
        for name in ("epochs", "batch_size", "num_splits", "step_size"):
            if getattr(self, name) < 1:
                yield f"{name} must be a positive integer, got {getattr(self, name)}"
        for name in ("train_size", "test_size", "max_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                yield f"{name} must be a positive integer, got {value}"
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
        if self.norm == "gbn" and 1 <= self.batch_size < self.num_splits:
            yield (
                f"num_splits ({self.num_splits}) is larger than batch_size ({self.batch_size}): "
                "each ghost batch needs at least one image"
            )
        if self.norm not in ("bn", "gbn"):
            yield f"norm must be bn or gbn, got {self.norm!r}"
        if self.arch not in ("resnet18", "resnet34"):
            yield f"arch must be resnet18 or resnet34, got {self.arch!r}"
        if self.schedule not in SCHEDULES:
            yield f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
        if self.precision not in PRECISIONS:
            yield f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        if self.loader not in LOADERS:
            yield f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}"
        unknown = set(self.augment) - set(AUGMENTATIONS)
        if unknown:
            yield f"unknown augmentation {sorted(unknown)}: choose from {', '.join(AUGMENTATIONS)}"
        if not 0.0 <= self.dropout < 1.0:
            yield f"dropout must be in [0, 1), got {self.dropout}"
        if not 0.0 <= self.label_smoothing < 1.0:
            yield f"label_smoothing must be in [0, 1), got {self.label_smoothing}"

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


def field_flags(config: Config) -> list[str]:
    """The command-line flags that give every field of ``config`` whatever the preset, as
    :func:`parse_field` reads them: ``--train-size none``, ``--no-amp``, ``--augment a,b``."""
    flags = []
    for name, value in config.items():
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


def hyperparameter_table(config: Config, fields: tuple[str, ...] | None = None) -> str:
    """A Markdown table of the config's hyperparameters (every field unless ``fields`` is given)."""
    chosen = [f for f in dataclasses.fields(config) if fields is None or f.name in fields]
    rows = ["| hyperparameter | value | meaning |", "|---|---|---|"]
    for f in chosen:
        value = getattr(config, f.name)
        shown = ", ".join(value) if isinstance(value, tuple) else value
        rows.append(f"| `{f.name}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)


# The fields a resumed run may change: where and how fast it computes (device, compiled kernels,
# DataLoader workers) and how long it goes on (epochs; a onecycle schedule is fixed at the start,
# so a onecycle run still refuses a new length). Every other field changes what is computed (the
# model, the data, the optimisation, the random streams), so a resume refuses a new value.
RESUMABLE_CHANGES = ("epochs", "device", "compile", "num_workers")


def recipe_name(config: Config) -> str:
    """A run folder name for ``config``'s recipe: readable, and different for every recipe
    (every field that a resume refuses to change), so that two recipes never share a folder."""
    recipe = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
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
            "decay alone makes the weights grow at every step: lower --weight-decay (or --lr)"
        )
    return "lower the learning rate (--lr), or the weight decay (--weight-decay) if you raised it"


RECIPE_FIELDS = (
    "arch", "norm", "num_splits", "dropout", "epochs", "batch_size", "lr", "momentum", "nesterov",
    "weight_decay", "decay_norm_bias", "label_smoothing", "schedule", "step_size", "gamma",
    "warmup", "augment", "rotate_degrees", "tta_flip", "seed", "precision",
)  # fmt: skip
