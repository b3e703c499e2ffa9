"""The driver: check the run directory, prepare the workload, connect to Ray, run the TorchTrainer.

How to connect to Ray is handed in (`Connect`, from distdl.cluster.connect): cluster launch sits
above the driver, and the driver only decides when to connect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from distdl.config import SESSION_KEYS, Config, config_differences, resolve_epochs, with_defaults, without_session_keys
from distdl.engine.checkpoints import checkpoint_step, reshard_for_workers, resume_checkpoint
from distdl.engine.deepspeed_config import build_deepspeed_config
from distdl.errors import ConfigError, RunDirError, TrainingFailed
from distdl.registry import WORKLOADS
from distdl.rundir import (
    CHECKPOINT_SCORE,
    CONFIG_FILE,
    SLURM_LOGS,
    STOP_REQUEST_FILE,
    Outcome,
    RunStorage,
    RunSummary,
    foreign_entries,
    read_summary,
    restore_snapshot,
    run_outcome,
)
from distdl.tracking import resolve_wandb_mode


def console_is_terminal() -> bool:
    return sys.stdout.isatty()


def console_for_batch_logs() -> None:
    """When the console is a file (a Slurm log, a Ray Job's log): no colour codes in Ray's line
    prefixes and no redrawn progress bars (datasets'), on the driver and, forwarded, on the workers.
    A user's own setting of either wins."""
    if console_is_terminal():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()  # read at import time; the driver may have imported it


def check_run_dir(config: Config, overwrite: bool) -> bool:
    """Whether this is a resume. Refuse a run directory holding a different config, unless overwriting.

    A rerun that changes only session keys (the step budget, where and how it runs) is a resume.
    Overwriting moves the old directory aside rather than deleting it. A run on object storage is
    pulled into its working copy first (everything but its checkpoints).
    """
    storage = config.run_storage
    storage.pull()
    run_dir = storage.local
    if not run_dir.exists():
        return False
    saved_file = run_dir / CONFIG_FILE
    if not saved_file.is_file():
        others = [e for e in storage.entries() if e != SLURM_LOGS] if storage.remote else foreign_entries(run_dir)
        if others:
            raise RunDirError(f"run directory {storage} exists and is not a distdl run (no {CONFIG_FILE}); "
                              "choose another run.name or run.storage_path")
        return False
    saved = with_defaults(yaml.safe_load(saved_file.read_text()) or {})
    differences = config_differences(without_session_keys(saved), without_session_keys(config.to_dict()))
    if not differences:
        return True
    if not overwrite:
        listed = "\n  ".join(differences)
        raise RunDirError(
            f"run directory {storage} holds a run with a different config:\n  {listed}\n"
            f"{_global_batch_hint(saved, config)}A resume may change only these keys: {', '.join(SESSION_KEYS)}. "
            "Use another run.name, or pass --overwrite to move the old run aside and start afresh."
        )
    print(f"distdl: moved the previous run to {storage.move_aside()}")
    return False


def _global_batch_hint(saved: dict[str, Any], config: Config) -> str:
    """What to pass when another worker count changed the global batch (given as accumulation steps)."""
    batch = saved.get("trainer", {}).get("global_batch_size")
    if saved.get("scaling", {}).get("num_workers") == config.scaling.num_workers or \
            batch in (None, config.trainer.global_batch_size):
        return ""
    return (f"A resume on another number of workers keeps the global batch: pass trainer.global_batch_size={batch} "
            "and gradient accumulation makes it up. ")


# Joins this process to the Ray a config names (ray.address), or starts an embedded one.
Connect = Callable[[Config], None]


def already_connected(config: Config) -> None:
    """The Connect for code that runs inside a Ray worker already (a Ray Tune trial)."""


def train(config: Config, connect: Connect, overwrite: bool = False, tune_callback: Optional[Any] = None,
          start_from: Optional[Path] = None) -> RunSummary:
    """Run (or resume) a training run and return its summary.

    Inside a Ray Tune trial, `tune_callback` (a Ray Train callback) passes every evaluation's report
    on to Tune, whose scheduler may stop the run. `start_from`: another run's checkpoint that a new
    run starts from, under its own hyperparameters (population-based training); the run's own
    checkpoints, once it has some, come first."""
    with stop_on_signal(config.run_storage) as signals:
        return run_training(config, signals.connecting(connect), overwrite, tune_callback, start_from)


def run_training(config: Config, connect: Connect, overwrite: bool, tune_callback: Optional[Any] = None,
                 start_from: Optional[Path] = None) -> RunSummary:
    console_for_batch_logs()
    payload = prepare_run(config, connect, overwrite)
    if payload is None:
        return read_summary(config.run_dir)
    connect(config)  # the embedded local Ray starts only once the run is known to be good
    payload = {**payload, "report_evaluations": tune_callback is not None,
               "start_from": str(start_from) if start_from else None, "signal_seconds": slurm_signal_seconds()}
    trainer = build_trainer(config, payload, [tune_callback] if tune_callback else [])
    storage = config.run_storage
    try:
        trainer.fit()
    except Exception as err:
        raise training_failure(err, storage) from err
    storage.pull()  # what rank 0 wrote, into this node's working copy of a run on object storage
    return read_summary(storage.local)


def prepare_run(config: Config, connect: Connect, overwrite: bool) -> Optional[dict[str, Any]]:
    """Everything before the workers start: the run directory checked and made, the workload's data
    prepared, the checkpoint to resume from verified, the config saved. Returns what every worker gets
    (train_loop_per_worker's payload), or None when the run is at its target already."""
    # Built once, here: a bad raw DeepSpeed JSON fails before Ray starts, and workers on other
    # nodes need not see the JSON file.
    ds_config = build_deepspeed_config(config.engine, config.trainer, config.scaling.num_workers,
                                       config.scaling.use_gpu)
    storage = config.run_storage
    resuming = check_run_dir(config, overwrite)
    if resuming and (repaired := restore_snapshot(storage)):
        print(f"distdl: {repaired}")
        storage.pull()  # the restored record, into a run on object storage's working copy
    pulled = storage.clock()
    if config.ray.address is not None:
        connect(config)  # a cluster that is unreachable or refuses us fails before the run directory is touched
    workload = WORKLOADS.get(config.workload)
    make_writable_run_dir(storage)
    try:
        # Before the step checks: with trainer.epochs the step budget follows from the data's size.
        steps_per_epoch = resolve_epochs(config, workload.prepare(config))
    except Exception:
        if not resuming:
            _remove_if_only_ours(config.run_dir)
        raise
    if steps_per_epoch:
        print(f"distdl: one epoch is {steps_per_epoch} steps; training for {config.trainer.max_steps} steps")
    if resuming and (checkpoint := resume_checkpoint(storage)) is not None:
        if reached_target(config):
            return None
        if reshard_for(config, checkpoint):
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    (config.run_dir / CONFIG_FILE).write_text(config.to_yaml())
    storage.push_written_since(pulled)  # the config, and what the workload prepared (a tokenizer)
    print(f"distdl: {'resuming' if resuming else 'starting'} run {storage} "
          f"({config.scaling.num_workers} workers, ZeRO-{config.engine.zero_stage}, {config.engine.precision})")
    return {"config": config.to_dict(), "deepspeed_config": ds_config,
            "wandb_mode": resolve_wandb_mode(config.tracking.wandb_mode), "console_is_terminal": console_is_terminal()}


def reshard_for(config: Config, checkpoint: str) -> bool:
    """The run's latest checkpoint, saved by another number of workers, made loadable by this run's;
    whether the workers load DeepSpeed's universal checkpoint. The global batch stays; gradient
    accumulation makes it up."""
    workers = config.scaling.num_workers
    reshard = reshard_for_workers(config.run_storage, checkpoint, workers)
    if reshard is None:
        return False
    how = "resharded its ZeRO state (DeepSpeed's universal checkpoint)" if reshard.universal else "loading it whole"
    print(f"distdl: {checkpoint} was saved by {reshard.saved_workers} workers; resuming on {workers}, {how}; the "
          f"global batch stays {config.trainer.global_batch_size} with gradient accumulation "
          f"{config.trainer.gradient_accumulation_steps}")
    return reshard.universal


def training_failure(err: Exception, storage: RunStorage) -> Exception:
    """What `fit()` raised, as one line per cause: a failed worker, or Ray Train's controller.

    Either may meet a fault first (a full disk: a worker saving its shards, or the controller
    recording the checkpoint). A checkpoint record the controller cut short is restored first, so
    the last complete checkpoint stays the one a rerun resumes from.
    """
    try:
        repaired = restore_snapshot(storage)
    except RunDirError as unreachable:  # the workers' failures matter more; the store's is said beside them
        repaired = str(unreachable)
    failures = getattr(err, "worker_failures", None)
    if failures:
        lines = [f"worker {rank} failed: {_last_line(failure.__cause__ or failure)}"
                 for rank, failure in sorted(failures.items())]
    else:
        controller_failure = getattr(err, "controller_failure", None)
        if controller_failure is None:
            return err
        lines = [f"Ray Train's controller failed while recording the run's state in {storage}: "
                 f"{_last_line(controller_failure)}"]
    return TrainingFailed(lines + ([repaired] if repaired else []))


def _last_line(error: BaseException) -> str:
    """The message's last line: Ray's nested tracebacks end in the cause (they stay in the Ray logs)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def make_writable_run_dir(storage: RunStorage) -> None:
    """Create the run directory and prove a file can be written there, before any worker starts.

    On object storage: an unreachable endpoint, a missing bucket and refused credentials fail here."""
    import tempfile

    if storage.remote:
        storage.check_writable()
        storage.local.mkdir(parents=True, exist_ok=True)  # its working copy, in this node's cache
        return
    run_dir = storage.local
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".distdl-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"run.storage_path: cannot write to {err.filename or run_dir} ({err.strerror or err}); "
                          "choose a writable run.storage_path (every node must be able to write there)") from None


# What asks a run to checkpoint and stop: Slurm's warning before a time limit (--signal=B:USR1@...), and
# the SIGTERM of a preemption (Kubernetes, a cloud's spot notice, `kill`), which leaves a grace period.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """SIGUSR1 and SIGTERM, while taken, ask the workers to checkpoint and stop at their next step.

    The request is a file in the run directory, which every node sees; rank 0 watches for it
    (distdl.stop_requests). `ray.init` puts in its own SIGTERM handler (exit at once), so the
    signals are taken again once connected (`connecting`), and given back at the end.
    """

    def __init__(self, storage: RunStorage) -> None:
        self.storage, self.replaced = storage, {}

    def request_stop(self, signum: int, _frame: Any) -> None:
        # A handler runs between two bytecodes of whatever the main thread does (Ray's wait for the
        # run): it must not raise into it, nor print while a print may be under way. A thread of its
        # own writes the request.
        threading.Thread(target=self.write_request, args=(signal.Signals(signum).name,), daemon=True).start()

    def write_request(self, name: str) -> None:
        try:
            self.storage.write_text(STOP_REQUEST_FILE, f"{name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except (OSError, RunDirError) as err:
            print(f"distdl: got {name} but could not write the stop request {STOP_REQUEST_FILE} ({err}); the run "
                  "goes on", file=sys.stderr, flush=True)
            return
        print(f"distdl: got {name}: checkpointing at the next step, then stopping", flush=True)

    def take(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread (a study's trials run elsewhere)
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            if current != self.request_stop:
                self.replaced[signum] = current
                signal.signal(signum, self.request_stop)

    def give_back(self) -> None:
        for signum, handler in self.replaced.items():
            signal.signal(signum, handler)

    def connecting(self, connect: Connect) -> Connect:
        def connect_then_take(config: Config) -> None:
            connect(config)
            self.take()
        return connect_then_take


@contextlib.contextmanager
def stop_on_signal(storage: RunStorage) -> Iterator[StopSignals]:
    """The stop signals taken for a run (a request left by an earlier session dropped first)."""
    storage.delete(STOP_REQUEST_FILE)
    signals = StopSignals(storage)
    signals.take()
    try:
        yield signals
    finally:
        signals.give_back()


def slurm_signal_seconds() -> Optional[int]:
    """How long before its time limit Slurm warns this job (`distdl submit slurm --signal-seconds`), if it does."""
    value = os.environ.get("DISTDL_SIGNAL_SECONDS", "")
    return int(value) if value.isdigit() else None


def reached_target(config: Config) -> bool:
    """Whether the run's latest checkpoint is already at this session's target step."""
    done = checkpoint_step(config.run_dir)
    target = config.trainer.stop_at_step or config.trainer.max_steps
    summary = read_summary(config.run_dir)
    reached = run_outcome(summary) is Outcome.TARGET_REACHED and summary["stopped_at_loss_step"] == done
    if done is not None and reached and config.trainer.stop_at_loss is not None:
        print(f"distdl: {config.run_dir} reached trainer.stop_at_loss at step {done} already; nothing to train.")
        return True
    if done is None or done < target:
        return False
    print(f"distdl: {config.run_dir} is at step {done} already (target {target}); nothing to train. "
          "Raise trainer.max_steps to go on.")
    return True


def _remove_if_only_ours(run_dir: Path) -> None:
    """A failed first start leaves no half-made run directory behind (only what prepare wrote)."""
    import shutil

    if not run_dir.is_dir() or (run_dir / CONFIG_FILE).exists():
        return
    for path in foreign_entries(run_dir):  # a Slurm job's own log stays: it tells what failed
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def quiet_train_logs() -> Any:
    """Ray Train's INFO lines (worker-group set-up, every reported checkpoint) in its log files only;
    its warnings and errors still reach the console."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING")


def build_trainer(config: Config, payload: dict[str, Any], callbacks: Optional[list[Any]] = None) -> Any:
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from distdl.loop import train_loop_per_worker

    storage = config.run_storage
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=config.run.name,
            # Given a filesystem, Ray Train takes a path inside it (bucket/prefix), not a URI.
            storage_path=storage.parent_path(),
            storage_filesystem=storage.filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=checkpoint_config(config),
            logging_config=quiet_train_logs(),
            callbacks=callbacks or [],
        ),
    )


def scaling_config(config: Config) -> Any:
    """Ray Train's workers for a config: training runs and the studies' measurement jobs alike."""
    from ray.train import ScalingConfig

    scaling = config.scaling
    return ScalingConfig(
        num_workers=scaling.num_workers,
        use_gpu=scaling.use_gpu,
        resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        placement_strategy=scaling.placement_strategy,
    )


def checkpoint_config(config: Config) -> Any:
    """Keep the latest checkpoints, or the best by the workload's metric (Ray always keeps the latest too)."""
    from ray.train import CheckpointConfig

    scored = WORKLOADS.get(config.workload).checkpoint_metric(config.sections) is not None
    return CheckpointConfig(num_to_keep=config.trainer.keep_checkpoints,
                            checkpoint_score_attribute=CHECKPOINT_SCORE if scored else None,
                            checkpoint_score_order="max")
