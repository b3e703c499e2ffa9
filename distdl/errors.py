"""Errors the command line reports as a message and exit code 2, not a traceback (importable without torch)."""

from distdl.config import ConfigError


class RunDirError(RuntimeError):
    """The run directory belongs to a different run."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing files or cannot be read."""


USER_ERRORS = (ConfigError, RunDirError, CheckpointError, FileExistsError)
