"""Trials side by side on the Ray cluster, through Ray Tune: the studies' trials and `distdl sweep`'s.

Each Tune trial drives one ordinary distdl run, whose Ray Train job runs inside the trial (Ray's
pattern for Train V2). Every evaluation of the run reports its metrics to Tune as it happens
(Ray's TuneReportCallback), so a Tune scheduler such as ASHA can stop a trial mid-run.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from ray.train.v2.api.callback import UserCallback

from distdl.config import Config, config_differences, config_from_dict, with_defaults, without_session_keys
from distdl.driver import already_connected, train
from distdl.errors import RunDirError, TrainingFailed
from distdl.rundir import SUMMARY_FILE, Outcome, RunSummary, foreign_entries, move_aside, run_outcome

# The resource each Tune trial itself holds: its function only drives its TorchTrainer, whose
# workers hold the CPUs and GPUs, but Tune needs some resource per trial.
TRIAL_DRIVER_RESOURCES = {"memory": 256 * 2**20}


def trials_that_fit(config: Config) -> int:
    """How many runs of this config the Ray cluster holds side by side (CPUs and GPUs); 0: none."""
    import ray

    available = ray.cluster_resources()
    scaling = config.scaling
    cpus = available.get("CPU", 0) // (scaling.num_workers * scaling.cpus_per_worker)
    gpus = available.get("GPU", 0) // scaling.num_workers if scaling.use_gpu else cpus
    return int(min(cpus, gpus))


def concurrent_trials(configs: list[Config], limit: Optional[int]) -> int:
    """How many trials' workers the cluster holds at once, at least 1 and at most `limit`."""
    parallel = max(1, min(trials_that_fit(config) for config in configs))
    return min(parallel, limit) if limit else parallel


def train_configs_with_tune(configs: list[Config], parallel: int, storage: Path, name: str) -> None:
    """Train whole configs (a study's trials) as a grid of Tune trials, `parallel` at a time; Tune's
    experiment is `storage/name`."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(train_config_trial, TRIAL_DRIVER_RESOURCES),
        param_space={"config": tune.grid_search([config.to_dict() for config in configs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=parallel),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1),
    )
    raise_failures(tuner.fit())


def train_config_trial(tune_config: dict[str, Any]) -> None:
    run_trial(config_from_dict(tune_config["config"]))


def run_trial(config: Config, checkpoints_to_tune: bool = False, start_from: Optional[Path] = None) -> RunSummary:
    """One Tune trial's run: its evaluations report to Tune as they happen; a run that diverged or
    stopped before its end fails the trial. With `checkpoints_to_tune`, Tune gets a copy of each
    checkpoint too (population-based training clones trials from them); `start_from`: the cloned
    checkpoint the run starts from."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.time()
    if not checkpoints_to_tune:  # a Tune trial runs inside Ray: already connected
        summary = train(config, already_connected, tune_callback=TuneReportCallback(), start_from=start_from)
    else:
        with CheckpointRelay(config.run.name) as relay:
            summary = train(config, already_connected, tune_callback=relay.callback, start_from=start_from)
    summary_file = config.run_dir / SUMMARY_FILE
    if summary and summary_file.is_file() and summary_file.stat().st_mtime < started:
        # The run had ended before (a sweep restored after its driver died between the run's end and
        # Tune's record of it): it trained and reported nothing now, and Tune wants the trial's metric.
        from distdl.loop import numeric_metrics  # what the loop reports to Tune, from the run's summary

        tune.report(numeric_metrics(summary["steps"], summary.get("final", {})))
    check_finished(config.run.name, summary)
    return summary


class CheckpointRelay:
    """Passes a run's reports to the Tune trial around it with their checkpoints, which Ray's
    TuneReportCallback leaves out (it gives Tune their paths only). Tune copies each checkpoint into
    the trial's own storage before the run goes on, so the run may delete its copy later.

    A Ray Train callback in the run's controller puts each report on a queue; a thread of the trial
    reports it to Tune and acknowledges it, which lets the controller go on."""

    def __init__(self, run_name: str) -> None:
        from ray.util.queue import Queue

        self.run_name = run_name
        self.reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.received = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.callback = ReportWithCheckpoint(self.reports, self.received)
        self.thread = threading.Thread(target=self.relay, name="distdl-checkpoints-to-tune", daemon=True)

    def __enter__(self) -> "CheckpointRelay":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reports.put(None)
        self.thread.join()

    def relay(self) -> None:
        from ray import tune

        while (report := self.reports.get()) is not None:
            metrics, checkpoint = report
            if checkpoint is not None:
                checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem)  # Tune's own class
                # Which run and step a trial that clones this checkpoint starts from.
                checkpoint.set_metadata({"run": self.run_name, "step": metrics["step"]})
            tune.report(metrics, checkpoint=checkpoint)
            self.received.put(True)


class ReportWithCheckpoint(UserCallback):
    """Runs in the Ray Train controller: rank 0's report and its checkpoint, to the CheckpointRelay."""

    def __init__(self, reports: Any, received: Any) -> None:
        self.reports, self.received = reports, received

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Any]) -> None:
        from ray.exceptions import RayActorError

        try:
            self.reports.put((dict(metrics[0]), checkpoint))
            self.received.get()  # the trial has handed it to Tune, which copied the checkpoint
        except RayActorError:
            pass  # the trial is gone (Tune paused or stopped it), and this run with it


def raise_failures(results: Any, describe: Callable[[Any], str] = lambda result: "") -> None:
    failed = [f"{describe(result)}{str(result.error).strip().splitlines()[-1]}" for result in results if result.error]
    if failed:
        raise TrainingFailed([f"{len(failed)} of {len(results)} trials failed:", *failed])


def check_finished(name: str, summary: RunSummary) -> None:
    """A trial that diverged or stopped early fails the study in one line (exit status 1), as a run does."""
    outcome = run_outcome(summary)
    if outcome is Outcome.DIVERGED:
        raise TrainingFailed([f"trial {name} diverged: its loss or gradient norm was not finite at step "
                              f"{summary['non_finite_step']}; lower its learning rate (or batch size)"])
    if outcome in (Outcome.STOPPED, Outcome.UNFINISHED):
        raise TrainingFailed([f"trial {name} stopped before its last step; run the same command again to go on"])


def check_trials_dir(directory: Path, file_name: str, kind: str, saved: dict[str, Any], overwrite: bool) -> None:
    """Refuse a study's or sweep's directory that holds one with other settings (`file_name` there
    holds `{kind: ..., "training": ...}`), unless overwriting: then it is moved aside, not deleted."""
    saved_file = directory / file_name
    if not saved_file.is_file():
        if directory.exists() and foreign_entries(directory):
            raise RunDirError(f"{kind} directory {directory} exists and is not a distdl {kind} (no {file_name}); "
                              f"choose another {kind}.name or run.storage_path")
        return
    old = yaml.safe_load(saved_file.read_text()) or {}
    old_own = {**saved[kind], **old.get(kind, {})}  # settings added since: at today's values
    differences = config_differences(old_own, saved[kind], f"{kind}.") + config_differences(
        without_session_keys(with_defaults(old.get("training", {}))), without_session_keys(saved["training"]))
    if not differences:
        return
    if not overwrite:
        listed = "\n  ".join(differences)
        raise RunDirError(f"{kind} directory {directory} holds a {kind} with other settings:\n  {listed}\n"
                          f"Use another {kind}.name, or pass --overwrite to move the old {kind} aside.")
    print(f"distdl: moved the previous {kind} to {move_aside(directory)}")
