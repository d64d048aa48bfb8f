"""The one domain error family: the CLI prints its text in red and exits non-zero."""


class GruLmError(Exception):
    """A user-facing error whose text says what is wrong, where, and how to fix it."""

    exit_code = 1
    silent = False  # a process of a job other than rank 0: rank 0 says it, once


class ConfigError(GruLmError):
    """A config file or override is invalid."""


class DataError(GruLmError):
    """A corpus cannot be found, downloaded, verified or read."""


class CheckpointError(GruLmError):
    """A checkpoint is missing, damaged, unsafe or does not match its config."""


class TrainingInterrupted(GruLmError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(GruLmError):
    """The training loss became NaN or infinite."""
