"""The errors a user can act on: the command line prints each as one line (exit status 2, or 1 for a
run that started and failed), never a traceback. The bottom module: it imports nothing of distdl,
nor torch, so anything may raise these."""


class UserError(Exception):
    """Something the user can fix; the message names the culprit and what is allowed."""


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown, of the wrong type or impossible."""


class RunDirError(UserError, RuntimeError):
    """The run directory belongs to a different run, or its storage cannot be reached."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing files or cannot be read."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files are shown to differ from what was saved (a sha256 that does not match, a
    listed file missing, an archive cut short): not a read that failed and may succeed again."""


class ClusterError(UserError, RuntimeError):
    """A cluster to submit to or join cannot be used: unreachable, refusing us, or missing a tool."""


class TrainingFailed(RuntimeError):
    """Training started but a worker or Ray Train's controller failed; one line per cause (exit status 1)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# What `distdl` prints as one line and exit status 2; FileExistsError: an export target in use.
USER_ERRORS = (UserError, FileExistsError)
