"""Stop requests: a run asked to checkpoint and stop (SIGTERM from Kubernetes, a cloud's spot notice or
`kill`; SIGUSR1, Slurm's warning before a time limit) does so at the next optimizer step.

The driver turns the signal into the run's stop request, a file in the run directory that every node
sees (driver.stop_on_signal). On rank 0 a thread looks for it every few seconds, so that no step waits
on storage; every step then asks all ranks whether one has seen it (loop.StopRules), one step behind,
so that no step waits for that answer either.

`signal_margin` says in the job log when Slurm's warning (`distdl submit slurm --signal-seconds`)
comes too late for a step and a checkpoint to finish before the time limit.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Callable, Iterator, Optional

from distdl.errors import RunDirError
from distdl.rundir import STOP_REQUEST_FILE, RunStorage

# How often rank 0 looks for a stop request: a stat on a shared filesystem, a request to object storage.
POLL_S = {"filesystem": 1.0, "object storage": 5.0}
# How many times the estimated time to stop the warning should leave (steps and saves vary).
SIGNAL_SAFETY = 1.5


def stop_requested(storage: RunStorage) -> bool:
    """Whether the run's stop request is there; a look that fails (a flaky filesystem's EIO or ESTALE,
    a store that hangs up) is not a request, and the watch looks again."""
    try:
        return storage.exists(STOP_REQUEST_FILE)
    except (RunDirError, OSError) as err:
        warnings.warn(f"could not look for a stop request: {err}")
        return False


def poll_interval(storage: RunStorage) -> float:
    return POLL_S["object storage" if storage.remote else "filesystem"]


class StopRequestWatch:
    """Rank 0's watch for the run's stop request: a thread that looks for it every `interval_s` until it
    is there (then says so in the log) or the session ends."""

    def __init__(self, storage: RunStorage, interval_s: float) -> None:
        self._seen, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(storage, interval_s), daemon=True,
                                        name="distdl-stop-request-watch")
        self._thread.start()

    def _watch(self, storage: RunStorage, interval_s: float) -> None:
        while not self._closed.is_set():
            if stop_requested(storage):
                self._seen.set()
                print("distdl: rank 0 saw the stop request: checkpointing after the next step, then stopping",
                      flush=True)
                return
            self._closed.wait(interval_s)

    def requested(self) -> bool:
        return self._seen.is_set()

    def close(self) -> None:
        self._closed.set()
        # A look at object storage that hangs must not hold the worker: the thread is a daemon.
        self._thread.join(timeout=30)


@contextlib.contextmanager
def stop_request_watch(storage: RunStorage, rank: int) -> Iterator[Callable[[], bool]]:
    """For the session: whether the run has been asked to stop, as rank 0 sees it (False elsewhere)."""
    if rank != 0:
        yield lambda: False
        return
    watch = StopRequestWatch(storage, poll_interval(storage))
    try:
        yield watch.requested
    finally:
        watch.close()


class SignalMarginCheck:
    """Once, at the first checkpoint saved after a step rate was logged: rank 0's warning in the job log
    when Slurm's warning comes `signal_seconds` (None: no Slurm warning) too close to the time limit."""

    def __init__(self, signal_seconds: Optional[int], storage: RunStorage) -> None:
        self.signal_seconds, self.poll_s = signal_seconds, poll_interval(storage)

    def after_save(self, save_s: float, samples_per_s: Optional[float], global_batch_size: int) -> None:
        if self.signal_seconds is None or not samples_per_s:
            return
        note = signal_margin(self.signal_seconds, global_batch_size / samples_per_s, save_s, self.poll_s)
        if note:
            print(f"distdl: {note}", flush=True)
        self.signal_seconds = None


def signal_margin(signal_seconds: int, step_s: float, save_s: float, poll_s: float) -> Optional[str]:
    """The job log's warning when a stop asked for `signal_seconds` before the time limit may not
    finish in time: the request is seen up to `poll_s` late, the step in flight and the next one run,
    then the checkpoint is saved. None when the warning leaves room enough."""
    needed = poll_s + 2 * step_s + save_s
    if signal_seconds >= SIGNAL_SAFETY * needed:
        return None
    advised = 10 * math.ceil(SIGNAL_SAFETY * needed / 10)
    return (f"warning: Slurm warns {signal_seconds} s before the time limit (--signal-seconds), and stopping this run "
            f"takes about {needed:.0f} s (up to {poll_s:.0f} s to see the request, two steps of {step_s:.1f} s, a "
            f"checkpoint of {save_s:.1f} s): a job stopped at its limit may lose its last checkpoint. Submit with "
            f"--signal-seconds={advised} or more")
