"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class EvaError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(EvaError, ValueError):
    """A hyperparameter or option that cannot work (non-positive epochs, unknown preset...)."""


class DataError(EvaError):
    """The data set is missing, unreadable or malformed."""


class RunFileError(EvaError):
    """A run folder or a file of a run (metrics.json, analysis.json, provenance.json...) that
    cannot be used."""


class CheckpointError(RunFileError):
    """A checkpoint (``last.pt``, ``best.pt``) that cannot be used."""


class TrainingDiverged(EvaError):
    """The loss became NaN or infinite."""


class Interrupted(EvaError):
    """Ctrl-C or SIGTERM stopped training; the message says how to resume."""


class DataFileError(DataError):
    """A file or folder of the data set that cannot be used. ``path`` names it and ``problem``
    says what is wrong ("is not a readable image"), so that a caller which extracted the data
    from an archive can name the archive's member instead of its own copy."""

    def __init__(self, message: str, path: str, problem: str) -> None:
        super().__init__(message)
        self.path = path
        self.problem = problem
