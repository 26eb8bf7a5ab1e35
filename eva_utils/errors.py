"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class EvaError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(EvaError, ValueError):
    """A hyperparameter or option that cannot work (non-positive epochs, unknown preset...)."""


class DataError(EvaError):
    """The data set is missing, unreadable or malformed."""


class CheckpointError(EvaError):
    """A run folder, checkpoint or metrics file that cannot be used."""


class TrainingDiverged(EvaError):
    """The loss became NaN or infinite."""


class Interrupted(EvaError):
    """Ctrl-C or SIGTERM stopped training; the message says how to resume."""
