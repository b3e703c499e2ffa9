"""The run directory's layout: the files distdl and Ray Train keep there, and how to read them.

Everything that reads a run directory (the driver, the worker loop, export, workloads that load
another run) goes through here; nothing here imports from the layers above.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, TypedDict

import yaml

from distdl.errors import ConfigError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# One JSON line per log and evaluation step (rank 0 appends), and the run's W&B id (a resume continues it).
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"
# A Slurm job's logs, written into the run directory before the run itself starts.
SLURM_LOGS = "slurm"
# A file whose presence asks a running run to checkpoint and stop (SIGUSR1 to the driver writes it).
STOP_REQUEST_FILE = "stop_request"
# Ray Train's record of the checkpoints it holds complete, and which one a resume starts from.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# distdl's copy of that record as of the last checkpoint, taken before the next one is reported.
SNAPSHOT_BACKUP = ".distdl-checkpoint-snapshot.json"
# The metric Ray Train ranks checkpoints by, when the workload names one (Workload.checkpoint_metric).
CHECKPOINT_SCORE = "checkpoint_score"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(value, handle, indent=2)
    os.replace(handle.name, path)


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
    stopped_on_request_step: Optional[int]  # checkpointed and stopped on SIGUSR1 / the stop request
    non_finite_step: Optional[int]  # the first step whose loss or gradient norm was not finite
    world_size: int
    backend: Optional[str]  # the process group's: gloo or nccl
    global_batch_size: int
    session_wall_time_s: float
    parameter_checksums: list[str]  # sha256 of each rank's fp32 weights: equal when the ranks agree
    ray_node_ids: list[Optional[str]]  # one per rank
    memory_per_rank: list[dict[str, Any]]
    optimizers: dict[str, str]  # each engine's optimizer class
    final: dict[str, Any]  # the last logged metrics
    # Model FLOPs per step, the session's mean TFLOP/s per device and MFU, the peak and its source,
    # and with trainer.compile the first compiled step's seconds (distdl.flops).
    utilization: dict[str, Any]
    wandb_run_dir: str  # when W&B logged the run
    wandb_run_id: str


def read_summary(run_dir: Path) -> RunSummary:
    summary_file = Path(run_dir) / SUMMARY_FILE
    return json.loads(summary_file.read_text()) if summary_file.is_file() else {}


# ----------------------------------------------------------------------------- Ray Train's checkpoint record


def _snapshot(run_dir: Path) -> dict[str, Any]:
    """Ray Train's checkpoint record ({} before the first checkpoint); a damaged one is named."""
    path = Path(run_dir) / RAY_SNAPSHOT
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); Ray Train cannot tell which checkpoint is complete") from None


def _latest_checkpoint_result(run_dir: Path) -> dict[str, Any]:
    """Ray Train's own record of the checkpoint it resumes from ({} before the first one)."""
    return _snapshot(run_dir).get("latest_checkpoint_result") or {}


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint Ray Train would resume from."""
    return (_latest_checkpoint_result(run_dir).get("metrics") or {}).get("step")


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint Ray Train resumes from: the latest one its snapshot records as complete.

    Never the highest-numbered folder: a save cut short leaves a folder that was never recorded.
    """
    run_dir = Path(run_dir)
    latest = _latest_checkpoint_result(run_dir).get("checkpoint_dir_name")
    if latest:
        return run_dir / latest
    if any(run_dir.glob("checkpoint_*")):
        raise ConfigError(f"run directory {run_dir} holds no complete checkpoint: Ray Train recorded none of its "
                          "checkpoint_* folders (a save cut short?)")
    raise ConfigError(f"run directory {run_dir} holds no checkpoint (checkpoint_*)")


def best_checkpoint(run_dir: Path) -> Path:
    """The kept checkpoint with the highest score, for runs that rank checkpoints by a metric."""
    results = _snapshot(run_dir).get("checkpoint_results", [])
    scored = [r for r in results if isinstance((r.get("metrics") or {}).get(CHECKPOINT_SCORE), (int, float))
              and (Path(run_dir) / r["checkpoint_dir_name"]).is_dir()]
    if not scored:
        raise ConfigError(f"run directory {run_dir} holds no scored checkpoint (its workload keeps the latest only); "
                          "use --checkpoint latest")
    # Ties go to the later checkpoint, as Ray Train ranks them.
    best = max(scored, key=lambda r: (r["metrics"][CHECKPOINT_SCORE], r["checkpoint_dir_name"]))
    return Path(run_dir) / best["checkpoint_dir_name"]


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """`latest`, `best`, or a checkpoint folder's name."""
    if which == "latest":
        return latest_checkpoint(run_dir)
    if which == "best":
        return best_checkpoint(run_dir)
    named = Path(run_dir) / which
    if not named.is_dir() or not named.name.startswith("checkpoint_"):
        kept = ", ".join(sorted(p.name for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())) or "none"
        raise ConfigError(f"--checkpoint {which!r}: not latest, best, or a checkpoint of {run_dir} (kept: {kept})")
    return named


def back_up_snapshot(run_dir: Path, recorded: str, timeout_s: float = 120.0) -> bool:
    """Copy Ray Train's record once it names checkpoint `recorded` (its controller records a checkpoint
    shortly after the workers report it), before the next checkpoint is reported.

    Ray Train rewrites the record in place for every checkpoint: on a full disk its write fails
    after truncating the file, and the record of every complete checkpoint would be lost with it.
    `restore_snapshot` puts this copy back. Returns False (nothing copied) if the record did not name
    `recorded` within `timeout_s`.
    """
    run_dir = Path(run_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _latest_checkpoint_result(run_dir).get("checkpoint_dir_name") == recorded:
                break
        except ConfigError:
            pass  # read while the controller was writing it
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    partial = run_dir / (SNAPSHOT_BACKUP + ".partial")
    shutil.copyfile(run_dir / RAY_SNAPSHOT, partial)
    os.replace(partial, run_dir / SNAPSHOT_BACKUP)
    return True


def restore_snapshot(run_dir: Path) -> Optional[str]:
    """Put distdl's copy back where Ray Train's record is missing or damaged; what was done, or None.

    A rename, not a write: it needs no free space on a full disk.
    """
    run_dir = Path(run_dir)
    backup, record = run_dir / SNAPSHOT_BACKUP, run_dir / RAY_SNAPSHOT
    if not backup.is_file() or not record.exists():
        return None
    try:
        json.loads(record.read_text())
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        os.replace(backup, record)
    return f"Ray Train's checkpoint record {record} was cut short; restored it as of the last complete checkpoint"
