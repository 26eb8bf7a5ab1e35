"""What a recorded run computed, in words: its norm layer, its effective ghost batches and the
preset whose recipe it trained, for the labels of compared runs.

A run on N ranks (torchrun) normalises each rank's slice of the global batch apart
(:mod:`eva_utils.ranks`): N ranks of BatchNorm are Ghost BatchNorm with N ghost batches, and N
ranks of GBN with k splits are GBN with k*N. A label names what was computed, not only what the
config asked for, so that two runs that normalised alike read alike. The functions take a
recorded config (a ``Config.to_dict()``, where a missing field has its default) and the number
of ranks the run trained on (metrics.json's ``environment.world_size``, 1 where it has none).
"""

from __future__ import annotations

from typing import Any

from .config import HYPERPARAMETERS, PRESETS, Config, preset_name
from .errors import ConfigError

# What the labels of compared runs always name; other recipe fields only where the runs differ.
NORM_FIELDS = ("norm", "num_splits", "dropout")
_DEFAULTS = Config()


def _splits(config: dict[str, Any]) -> int:
    """GBN's splits on each rank; 1 for BatchNorm."""
    if config.get("norm", _DEFAULTS.norm) != "gbn":
        return 1
    return config.get("num_splits", _DEFAULTS.num_splits)


def ghost_batch_size(config: dict[str, Any], world_size: int = 1) -> int:
    """The images each BatchNorm normalises in a full training batch: batch_size /
    (world_size * num_splits), num_splits being 1 for norm "bn" (the whole batch in one process)."""
    return config.get("batch_size", _DEFAULTS.batch_size) // (world_size * _splits(config))


def norm_label(config: dict[str, Any], world_size: int = 1, ghost_sizes: bool = False) -> str:
    """The norm layer as computed, and the dropout: "GBN 2 splits, dropout 0.1" in one process,
    "2 ranks x BatchNorm = GBN (2 ghost batches of 64), no dropout" on 2. ``ghost_sizes`` names
    the images per BatchNorm for one process too, for a label read beside runs on several ranks."""
    splits, size = _splits(config), ghost_batch_size(config, world_size)
    if config.get("norm", _DEFAULTS.norm) != "gbn":
        norm = "BatchNorm"
    else:  # one ghost batch is the whole batch: exactly BatchNorm2d
        norm = "GBN 1 split (= BatchNorm)" if splits == 1 else f"GBN {splits} splits"
    if world_size > 1:  # each rank's BatchNorm sees only its slice: ghost batches
        per_rank = "BatchNorm" if splits == 1 else norm
        ghosts = f"{world_size * splits} ghost batches of {size}"
        norm = f"{world_size} ranks x {per_rank} = GBN ({ghosts})"
    elif ghost_sizes:
        norm = (
            f"{norm} (ghost batches of {size})" if splits > 1 else f"BatchNorm (batches of {size})"
        )
    dropout = config.get("dropout") or 0
    return f"{norm}, " + (f"dropout {dropout:g}" if dropout else "no dropout")


def recipe_preset(config: dict[str, Any], world_size: int = 1) -> str | None:
    """The preset whose whole recipe a run of ``config`` on ``world_size`` ranks trained, its
    norm layer counted by its ghost batches (session8's 2 splits are 1 split on each of 2
    ranks, or BatchNorm on each), or None: a custom recipe, or no config recorded."""
    if not config:
        return None
    try:
        return preset_name(Config.from_dict(config), world_size)
    except (ConfigError, TypeError):  # a config this version cannot read is no preset's
        return None


def base_preset(config: dict[str, Any]) -> str | None:
    """The preset whose recipe ``config`` follows, apart from its norm layer and dropout."""
    compared = [name for name in HYPERPARAMETERS if name not in (*NORM_FIELDS, "epochs")]
    for name, preset in PRESETS.items():
        if all(same_value(config.get(key), getattr(preset, key)) for key in compared):
            return name
    return None


def same_value(a: Any, b: Any) -> bool:
    """Equal, counting a JSON list and a Config tuple with the same items as equal."""
    sequences = (list, tuple)
    return list(a) == list(b) if isinstance(a, sequences) and isinstance(b, sequences) else a == b


def shown_value(value: Any) -> str:
    """A recorded field's value as a label shows it."""
    if value is None:  # train_size, test_size: the whole set
        return "all"
    return "+".join(value) if isinstance(value, list | tuple) else f"{value}"
