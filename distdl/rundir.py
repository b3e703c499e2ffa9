"""The run directory's layout: the files distdl and Ray Train keep there, where the run lives (a
folder or object storage), and how to read its config, metrics, summary (and how the run ended) and
Ray Train's checkpoint record. Nothing here imports from the layers above.

What is inside a checkpoint, and which checkpoint is the latest or best, is distdl/engine/checkpoints.py's.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Optional, TypedDict
from urllib.parse import urlparse

import yaml

from distdl.errors import CheckpointDamaged, ConfigError, RunDirError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# One JSON line per log and evaluation step (rank 0 appends), and the run's W&B id (a resume continues it).
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"
# A Slurm job's logs, written into the run directory before the run itself starts.
SLURM_LOGS = "slurm"
# A file whose presence asks a running run to checkpoint and stop (SIGUSR1 or SIGTERM to the driver writes it).
STOP_REQUEST_FILE = "stop_request"
# Ray Train's record of the checkpoints it holds complete, and which one a resume starts from.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# distdl's copy of that record as of the last checkpoint, taken before the next one is reported.
SNAPSHOT_BACKUP = ".distdl-checkpoint-snapshot.json"
# The metric Ray Train ranks checkpoints by, when the workload names one (Workload.checkpoint_metric).
CHECKPOINT_SCORE = "checkpoint_score"


# Where a run on object storage keeps its working copy on each node; DISTDL_CACHE moves it.
CACHE_ENV = "DISTDL_CACHE"
CHECKPOINT_PREFIX = "checkpoint_"


def is_uri(location: str) -> bool:
    """An object-store (or other pyarrow filesystem) URI such as s3://bucket/path, not a local path."""
    return "://" in location and not location.startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "distdl").expanduser()


class RunStorage:
    """A run directory where it lives, a local folder or an object store (s3://, gs://, through
    pyarrow's filesystems, as Ray Train stores checkpoints), and the local folder the run works in.

    For a local run directory the two are one folder and pushing and pulling do nothing. On object
    storage the run works in a copy in the node's cache (`local`): the driver pulls the run's files
    (config, summary, metrics, tokenizer: everything but checkpoints) before it looks at them and pushes
    what it writes; rank 0 pushes its metrics with every checkpoint and everything it wrote at the
    end; checkpoints go to storage through Ray Train itself. Credentials come from the standard
    places (AWS_* variables and ~/.aws files, Google's application credentials), never from a config.
    """

    def __init__(self, location: str | Path, key: str = "run.storage_path", cache: str = "runs") -> None:
        """`key`: the config key that named the location (errors name it); `cache`: the folder of the node's
        cache its working copy goes in."""
        self.key, self.cache = key, cache
        location = str(location)
        self.remote = is_uri(location)
        if self.remote and (urlparse(location).username or urlparse(location).query):
            # Credentials would be printed with every message; options would end up inside object names.
            raise ConfigError(f"{key}: give the URI as scheme://bucket/path, without credentials or ?options; "
                              "credentials and the endpoint come from the environment (AWS_* variables, "
                              "AWS_ENDPOINT_URL, ~/.aws)")
        self.uri = location.rstrip("/") if self.remote else str(Path(location.removeprefix("file://")).expanduser().resolve())

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @cached_property
    def local(self) -> Path:
        if not self.remote:
            return Path(self.uri)
        parsed = urlparse(self.uri)
        return cache_root() / self.cache / parsed.scheme / parsed.netloc / parsed.path.strip("/")

    @cached_property
    def _filesystem(self) -> tuple[Any, str]:
        import pyarrow.fs

        _release_filesystems_at_exit(self)
        try:
            return pyarrow.fs.FileSystem.from_uri(self.uri)
        except (pyarrow.ArrowInvalid, ValueError, OSError) as err:
            raise ConfigError(f"{self.key}: cannot open {self.uri} ({err})") from None

    @property
    def filesystem(self) -> Any:
        """The pyarrow filesystem (Ray Train's storage_filesystem); None for a local folder."""
        return self._filesystem[0] if self.remote else None

    def path(self, name: str = "") -> str:
        """A file's path inside the filesystem (bucket/key for object storage)."""
        base = self._filesystem[1].rstrip("/")
        return f"{base}/{name}" if name else base

    def parent_path(self) -> str:
        """Ray Train's storage_path: the folder holding the run directory (inside `filesystem`)."""
        return self.path().rsplit("/", 1)[0] if self.remote else str(Path(self.uri).parent)

    def location(self, name: str) -> str:
        """A file's URI or path, for messages."""
        return f"{self.uri}/{name}" if self.remote else str(Path(self.uri) / name)

    def _call(self, what: str, action: Any) -> Any:
        """Run a storage call; an unreachable or refusing store is named with the URI and the way out."""
        try:
            return action()
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise RunDirError(f"{self.key}: cannot {what} {self.uri} ({_storage_reason(err)}); check the "
                              "bucket's name, the endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_* "
                              "variables or ~/.aws)") from None

    # ---- files at the run directory's top level
    def exists(self, name: str = "") -> bool:
        if not self.remote:
            return (self.local / name).exists()
        import pyarrow.fs

        info = self._call("read", lambda: self.filesystem.get_file_info(self.path(name)))
        return info.type != pyarrow.fs.FileType.NotFound

    def read_text(self, name: str) -> Optional[str]:
        """A file's text, or None where there is none."""
        if not self.remote:
            path = self.local / name
            # A file cut short may end inside a character: read it as damaged text, not an exception.
            return path.read_bytes().decode(errors="replace") if path.is_file() else None
        if not self.exists(name):
            return None
        return self._call("read", lambda: _read_remote(self.filesystem, self.path(name))).decode(errors="replace")

    def write_text(self, name: str, text: str) -> None:
        """Whole or not at all: renamed into place locally, one PUT on object storage."""
        if self.remote:
            self.write_bytes(name, text.encode())
        else:
            _write_atomically(self.local / name, text)

    def delete(self, name: str) -> None:
        if not self.remote:
            (self.local / name).unlink(missing_ok=True)
        elif self.exists(name):
            self._call("delete from", lambda: self.filesystem.delete_file(self.path(name)))

    def entries(self) -> list[str]:
        """The names at the run directory's top level ([] when it does not exist)."""
        return sorted(self._entry_kinds())

    def _entry_kinds(self) -> dict[str, bool]:
        """Each top-level name, and whether it is a folder."""
        if not self.remote:
            return {p.name: p.is_dir() for p in self.local.iterdir()} if self.local.is_dir() else {}
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path(), allow_not_found=True)
        infos = self._call("list", lambda: self.filesystem.get_file_info(selector))
        return {info.base_name: info.type == pyarrow.fs.FileType.Directory for info in infos}

    def file_names(self, folder: str) -> list[str]:
        """The files under a folder of the run directory, as paths relative to it."""
        return sorted(self.file_sizes(folder))

    def file_sizes(self, folder: str) -> dict[str, int]:
        """Each file under a folder of the run directory (a path relative to it) and its size in bytes."""
        if not self.remote:
            root = self.local / folder
            return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        import pyarrow.fs

        base = self.path(folder)
        selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._call("list", lambda: self.filesystem.get_file_info(selector))
        return {info.path[len(base) + 1:]: info.size for info in infos if info.type == pyarrow.fs.FileType.File}

    def download(self, name: str, target: Path) -> str:
        """Stream a file of object storage to `target` (the caller renames it into place); its sha256."""
        digest = hashlib.sha256()

        def copy() -> None:
            with self.filesystem.open_input_stream(self.path(name)) as stream, open(target, "wb") as out:
                while block := stream.read(8 << 20):
                    digest.update(block)
                    out.write(block)

        self._call("read", copy)
        return digest.hexdigest()

    def checkpoints(self) -> list[str]:
        """The checkpoint folders the run directory holds."""
        return sorted(name for name, folder in self._entry_kinds().items() if folder and is_checkpoint(name))

    def check_writable(self) -> None:
        """Prove an object can be written (and removed) before any worker starts."""
        probe = f".distdl-write-check-{os.getpid()}"
        self.write_text(probe, "")
        self.delete(probe)

    # ---- the working copy of a run on object storage
    def pull(self, fresh: bool = True, skip: Callable[[str], bool] = lambda name: False) -> None:
        """Copy the run's files but its checkpoints into the working copy (`skip`: paths, relative to the
        run directory, to leave out too). Each file lands whole, renamed into place, so a file the
        store holds is never missing locally, and processes of one node may pull at once. `fresh`:
        then delete what the store no longer holds (left by a deleted or moved-aside run), but never
        a Slurm job's log, what `skip` names, or another process's download in progress."""
        if not self.remote:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        pulled = set()
        for name, folder in self._entry_kinds().items():
            if not (folder and is_checkpoint(name)):
                pulled |= self._download(name, self.local / name, skip)
        if fresh:
            for path in sorted(self.local.rglob("*"), reverse=True):  # files before their folders
                relative = path.relative_to(self.local).as_posix()
                top = relative.split("/")[0]
                # Checkpoints are pull_checkpoint's (checked against the store when used).
                if top == SLURM_LOGS or is_checkpoint(top) or skip(relative) or _in_progress(path.name):
                    continue
                if path.is_file() and relative not in pulled:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()

    def clock(self) -> float:
        """Now, by the working copy's filesystem: a later write there has at least this st_mtime (a
        clock of its own, which may be coarse or, on NFS, another machine's)."""
        if not self.remote:
            return 0.0
        mark = self.local / ".distdl-clock"
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        return mark.stat().st_mtime

    def pull_checkpoint(self, name: str) -> Path:
        """A checkpoint folder in the working copy, downloaded from object storage once while the store
        holds the same files (a lock makes the node's other processes wait for it)."""
        target = self.local / name
        if not self.remote:
            return target
        from filelock import FileLock

        listing, mark = json.dumps(self.file_sizes(name), sort_keys=True), target / ".distdl-complete"
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{target}.lock"):
            if not (mark.is_file() and mark.read_text() == listing):
                shutil.rmtree(target, ignore_errors=True)
                self._download(name, target)
                mark.write_text(listing)
        return target

    def push(self, *names: str) -> None:
        """Copy files of the working copy's top level to object storage (those absent are skipped)."""
        self.push_files(self.local / name for name in names if (self.local / name).is_file())

    def push_written_since(self, started: float, folder: str = "") -> None:
        """Push the files of the working copy (or of one of its folders) written since `started` (a
        `clock()`); outside a named folder, checkpoints stay to Ray Train."""
        if not self.remote:
            return
        root = self.local / folder
        self.push_files(path for path in (sorted(root.rglob("*")) if root.is_dir() else [])
                        if path.is_file() and path.stat().st_mtime >= started and not _in_progress(path.name)
                        and not path.name.startswith(".distdl-")
                        and (folder or not is_checkpoint(path.relative_to(root).parts[0]) or path.parent == root))

    def push_new(self, folder: str, stored: Collection[str]) -> None:
        """Push the files of a working-copy folder that are not among `stored` (its files on the store)."""
        if not self.remote:
            return
        root, known = self.local / folder, set(stored)
        self.push_files(path for path in sorted(root.rglob("*")) if path.is_file()
                        and path.relative_to(root).as_posix() not in known and not _in_progress(path.name)
                        and not path.name.startswith(".distdl-"))

    def push_files(self, paths: Iterable[Path]) -> None:
        """Push files of the working copy to the same names on object storage, streamed."""
        if not self.remote:
            return
        for path in paths:
            name = Path(path).relative_to(self.local).as_posix()

            def put(path: Path = Path(path), name: str = name) -> None:
                with open(path, "rb") as source, self.filesystem.open_output_stream(self.path(name)) as stream:
                    shutil.copyfileobj(source, stream, 8 << 20)

            self._call("write to", put)

    def write_bytes(self, name: str, data: bytes) -> None:
        def put() -> None:
            with self.filesystem.open_output_stream(self.path(name)) as stream:
                stream.write(data)

        self._call("write to", put)

    def _download(self, name: str, target: Path, skip: Callable[[str], bool] = lambda name: False) -> set[str]:
        """A file or a folder of the run directory to `target`, file by file, each renamed into place;
        the paths (relative to the run directory) it holds."""
        import pyarrow.fs

        info = self._call("read", lambda: self.filesystem.get_file_info(self.path(name)))
        files = ([(name, target)] if info.type == pyarrow.fs.FileType.File else
                 [(f"{name}/{relative}", target / relative) for relative in self.file_names(name)])
        for source, destination in files:
            if skip(source):
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
            self.download(source, partial)
            os.replace(partial, destination)
        return {source for source, _ in files}

    def move_aside(self) -> str:
        """Move the run directory to `<name>.replaced-<time>` (never deleted); the new location."""
        if not self.remote:
            return str(move_aside(self.local))
        import pyarrow.fs

        aside = RunStorage(f"{self.uri}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        # Object stores have no rename of a folder: copied, then the original removed.
        self._call("copy", lambda: pyarrow.fs.copy_files(self.path(), aside.path(), source_filesystem=self.filesystem,
                                                         destination_filesystem=self.filesystem))
        self._call("delete from", lambda: self.filesystem.delete_dir(self.path()))
        shutil.rmtree(self.local, ignore_errors=True)
        return aside.uri


_OPENED: "weakref.WeakSet[RunStorage]" = weakref.WeakSet()
_OPENED_AT_EXIT: list[bool] = []  # whether the handler below is registered


def _release_filesystems_at_exit(storage: RunStorage) -> None:
    """pyarrow shuts the AWS SDK down at exit (an atexit handler of pyarrow.fs); an S3 filesystem
    destroyed after that crashes the interpreter (apache/arrow#38352, #41087). So, registered after
    pyarrow's handler and therefore run before it, distdl drops its filesystems first, and collects the
    reference cycles (an exception's frames, say) that could still hold one."""
    if not _OPENED_AT_EXIT:
        atexit.register(_release_filesystems)
        _OPENED_AT_EXIT.append(True)
    _OPENED.add(storage)


def _release_filesystems() -> None:
    for storage in list(_OPENED):
        storage.__dict__.pop("_filesystem", None)
    _OPENED.clear()
    gc.collect()


def _in_progress(name: str) -> bool:
    """A file some process is still writing: a download, a shard, a JSON record, or a file lock."""
    return name.endswith((".partial", ".tmp", ".lock")) or ".partial-" in name


def is_checkpoint(name: str) -> bool:
    """A checkpoint folder's name (Ray Train's own record, checkpoint_manager_snapshot.json, is not one)."""
    return name.startswith(CHECKPOINT_PREFIX) and name != RAY_SNAPSHOT


def _read_remote(filesystem: Any, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _storage_reason(err: OSError) -> str:
    """The object store's own words (pyarrow's message carries the AWS error name), without request ids."""
    text = str(err).split(" (Request ID")[0]
    return text.split("AWS Error ", 1)[-1] if "AWS Error " in text else text


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def foreign_entries(directory: Path) -> list[Path]:
    """What a run or study directory holds besides a Slurm job's logs (written before the run starts)."""
    return [path for path in directory.iterdir() if path.name != SLURM_LOGS]


def move_aside(directory: Path) -> Path:
    """Rename a run or study directory to `<name>.replaced-<time>` (never deleted), and return the new path.

    Two replacements within one second get `-2`, `-3`, ... rather than colliding.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = directory.with_name(f"{directory.name}.replaced-{stamp}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = directory.with_name(f"{directory.name}.replaced-{stamp}-{suffix}")
    directory.rename(aside)
    return aside


def write_json(path: Path, value: Any) -> None:
    """Whole or not at all: a temporary file renamed into place."""
    _write_atomically(path, json.dumps(value, indent=2))


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file holding an object; errors name `what` (the key or flag that pointed at it) and the file."""
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what}: {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what}: {path} must hold a JSON object")
    return values


def saved_config(run_dir: Path, workload: str | None = None, key: str = "") -> dict[str, Any]:
    """The config a run directory holds, optionally of a given workload; errors name the directory
    (and the config key that pointed at it)."""
    prefix = f"{key}: " if key else ""
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{prefix}{run_dir} is not a distdl run directory (no {CONFIG_FILE})")
    saved = yaml.safe_load(config_file.read_text()) or {}
    if workload is not None and saved.get("workload") != workload:
        raise ConfigError(f"{prefix}{run_dir} is a {saved.get('workload')!r} run, not a {workload} run")
    return saved


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines, oldest first ([] before the first log step)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class RunSummary(TypedDict, total=False):
    """summary.json: how a training session ended, written by rank 0 at its end.

    A workload adds its own entries beside these (Workload.summary: GLUE's best step and its
    submission folder, for example). A run directory without a summary reads as {}.
    """

    steps: int  # the last step this session trained
    max_steps: int
    completed: bool  # reached max_steps (or the target loss) with every value finite
    stopped_at_loss_step: Optional[int]  # trainer.stop_at_loss reached at this log step
    stopped_on_request_step: Optional[int]  # checkpointed and stopped on SIGUSR1 or SIGTERM (the stop request)
    non_finite_step: Optional[int]  # the first step whose loss or gradient norm was not finite
    world_size: int
    backend: Optional[str]  # the process group's: gloo or nccl
    global_batch_size: int
    session_wall_time_s: float
    parameter_checksums: list[str]  # sha256 of each rank's fp32 weights: equal when the ranks agree
    ray_node_ids: list[Optional[str]]  # one per rank
    memory_per_rank: list[dict[str, Any]]
    optimizers: dict[str, str]  # each engine's optimizer class
    trainable_parameters: dict[str, int]  # each engine's trainable weights (whole, also under ZeRO-3)
    final: dict[str, Any]  # the last logged metrics
    # Model FLOPs per step, the session's mean TFLOP/s per device and MFU, the peak and its source,
    # and with trainer.compile the first compiled step's seconds (distdl.flops).
    utilization: dict[str, Any]
    wandb_run_dir: str  # when W&B logged the run
    wandb_run_id: str


def read_summary(run_dir: Path) -> RunSummary:
    summary_file = Path(run_dir) / SUMMARY_FILE
    return json.loads(summary_file.read_text()) if summary_file.is_file() else {}


class Outcome(Enum):
    """How a training session ended, as its summary tells it (`run_outcome`)."""

    FINISHED = "finished"  # trained to trainer.max_steps with every value finite
    TARGET_REACHED = "target reached"  # trainer.stop_at_loss reached: finished early, by design
    STOPPED = "stopped"  # checkpointed and stopped on request (SIGUSR1 or SIGTERM): a rerun goes on
    DIVERGED = "diverged"  # a loss or gradient norm was not finite; nothing after the last good checkpoint saved
    UNFINISHED = "unfinished"  # ended before its last step otherwise (trainer.stop_at_step)
    NO_SUMMARY = "no summary"  # the session wrote none (it never ended on its own)

    @property
    def done(self) -> bool:
        """Whether the run has nothing left to train."""
        return self in (Outcome.FINISHED, Outcome.TARGET_REACHED)


def run_outcome(summary: RunSummary) -> Outcome:
    """The one reading of how a session ended: for the command line's exit status, Tune's trials, the
    driver and the sweep report alike."""
    if not summary:
        return Outcome.NO_SUMMARY
    if summary.get("non_finite_step") is not None:
        return Outcome.DIVERGED
    if summary.get("completed"):
        return Outcome.TARGET_REACHED if summary.get("stopped_at_loss_step") is not None else Outcome.FINISHED
    if summary.get("stopped_on_request_step") is not None:
        return Outcome.STOPPED
    return Outcome.UNFINISHED


# ----------------------------------------------------------------------------- Ray Train's checkpoint record


def checkpoint_record(run_dir: Path) -> dict[str, Any]:
    """Ray Train's checkpoint record ({} before the first checkpoint); a damaged one is named."""
    path = Path(run_dir) / RAY_SNAPSHOT
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); Ray Train cannot tell which checkpoint is complete") from None


# Ray Train's record as it was before a resume fell back from damaged checkpoints (for a look).
RECORD_BEFORE_FALLBACK = "checkpoint_manager_snapshot.before-fallback.json"


def point_record_at(run_dir: Path, kept: dict[str, Any]) -> None:
    """Make checkpoint result `kept` (one of Ray Train's record) the latest, dropping the later ones
    (pending ones too), so that Ray Train resumes from it. The record is written whole (a temporary
    file renamed into place); the one it replaces is kept beside it."""
    path = Path(run_dir) / RAY_SNAPSHOT
    record = checkpoint_record(run_dir)
    shutil.copyfile(path, Path(run_dir) / RECORD_BEFORE_FALLBACK)

    def kept_or_earlier(result: dict[str, Any]) -> bool:
        return result.get("checkpoint_dir_name", "") <= kept["checkpoint_dir_name"]

    results, indices = record.get("checkpoint_results", []), record.get("checkpoint_report_indices", [])
    keep = [position for position, result in enumerate(results) if kept_or_earlier(result)]
    record["checkpoint_results"] = [results[position] for position in keep]
    if len(indices) == len(results):
        record["checkpoint_report_indices"] = [indices[position] for position in keep]
    record["pending_training_results"] = [pending for pending in record.get("pending_training_results", [])
                                          if kept_or_earlier(pending)]
    record["latest_checkpoint_result"] = kept
    _write_atomically(path, json.dumps(record, indent=2))


def aside(run_dir: Path, name: str) -> str:
    """Move a damaged checkpoint folder out of the run's checkpoints, kept for a look (an earlier one
    moved aside under the same name is kept too); its new name."""
    if Path(name).name != name or not is_checkpoint(name):
        raise CheckpointDamaged(f"{RAY_SNAPSHOT} names {name!r}, which is not a checkpoint folder of {run_dir}")
    target = Path(run_dir) / f"damaged-{name}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = Path(run_dir) / f"damaged-{name}.{suffix}"
    (Path(run_dir) / name).rename(target)
    return target.name


def back_up_snapshot(storage: RunStorage, recorded: str, timeout_s: float = 120.0) -> bool:
    """Copy Ray Train's record once it names checkpoint `recorded` (its controller records a checkpoint
    shortly after the workers report it), before the next checkpoint is reported.

    Ray Train rewrites the record in place for every checkpoint: on a full disk its write fails
    after truncating the file, and the record of every complete checkpoint would be lost with it.
    `restore_snapshot` puts this copy back. Returns False (nothing copied) if the record did not name
    `recorded` within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        record = storage.read_text(RAY_SNAPSHOT)
        try:
            if record and (json.loads(record).get("latest_checkpoint_result") or {}) \
                    .get("checkpoint_dir_name") == recorded:
                break
        except json.JSONDecodeError:
            pass  # read while the controller was writing it
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25 if storage.remote else 0.05)  # a request to the object store each time
    if storage.remote:
        storage.write_text(SNAPSHOT_BACKUP, record)  # one PUT: whole or not at all
        return True
    partial = storage.local / (SNAPSHOT_BACKUP + ".partial")
    shutil.copyfile(storage.local / RAY_SNAPSHOT, partial)
    os.replace(partial, storage.local / SNAPSHOT_BACKUP)
    return True


def restore_snapshot(storage: RunStorage) -> Optional[str]:
    """Put distdl's copy back where Ray Train's record is missing or damaged; what was done, or None.

    Locally a rename, not a write: it needs no free space on a full disk.
    """
    backup, record = storage.read_text(SNAPSHOT_BACKUP), storage.read_text(RAY_SNAPSHOT)
    if backup is None or record is None:
        return None
    try:
        json.loads(record)
        return None
    except json.JSONDecodeError:
        if storage.remote:
            storage.write_text(RAY_SNAPSHOT, backup)
            storage.delete(SNAPSHOT_BACKUP)
        else:
            os.replace(storage.local / SNAPSHOT_BACKUP, storage.local / RAY_SNAPSHOT)
    return f"Ray Train's checkpoint record {storage.location(RAY_SNAPSHOT)} was cut short; restored it as of the " \
           "last complete checkpoint"
