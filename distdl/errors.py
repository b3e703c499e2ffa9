"""Errors the command line reports as a message and exit code 2, not a traceback (importable without torch)."""

from distdl.config import ConfigError


class RunDirError(RuntimeError):
    """The run directory belongs to a different run."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing files or cannot be read."""


class TrainingFailed(RuntimeError):
    """Training started but a worker or Ray Train's controller failed; one line per cause."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


USER_ERRORS = (ConfigError, RunDirError, CheckpointError, FileExistsError)
