"""`distdl study NAME FILE`: train a study's trials (each an ordinary distdl run), measure them on
the workers, and write report.md, results.json and the plots into the study directory.

The study directory is `<run.storage_path>/<study.name>/`; each trial is a run directory under its
`trials/`. A study may add trials whose settings come from the first ones' training (the sharpness
study's isotropic arm at the matched temperature); they train after them. Running the same command again resumes: finished trials are neither retrained nor
remeasured, and the report is written afresh.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from distdl.config import Config, config_differences, config_from_dict, with_defaults, without_session_keys
from distdl.driver import Connect, already_connected, quiet_train_logs, scaling_config, train, training_failure
from distdl.errors import ConfigError, RunDirError, TrainingFailed
from distdl.registry import STUDIES, WORKLOADS
from distdl.rundir import RunStorage, foreign_entries, is_uri, move_aside, write_json
from distdl.studies import jobs
from distdl.studies.base import Study, StudyReport, read_study_file

STUDY_FILE = "study.yaml"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


def run_study(name: str, path: str | Path, overrides: list[str], overwrite: bool,
              connect: Connect) -> tuple[Path, StudyReport]:
    study_class, section, base = read_study(name, path, overrides)
    study_dir = Path(base.run.storage_path) / section.name
    saved = saved_settings(name, section, base)
    check_study_dir(study_dir, saved, overwrite)
    study: Study = study_class(section, base.to_dict(), study_dir)
    train_examples = WORKLOADS.get(base.workload).prepare(base)
    trials = study.trials(train_examples)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / STUDY_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    train_trials(study, trials, base, section.max_concurrent_trials, connect)
    if later := study.later_trials(trials):
        print(f"distdl: {len(later)} more trials, whose settings come from the trained ones")
        train_trials(study, later, base, section.max_concurrent_trials, connect)
        trials = trials + later
    run_measurements(base, study.measure_tasks(trials), study_class.measure, section, study_dir / "ray", connect)
    report = study.write_report(trials)
    write_json(study_dir / RESULTS_FILE, report.results)
    (study_dir / REPORT_FILE).write_text(report.markdown)
    log_to_wandb(report, section.name, base, study_dir)
    return study_dir, report


def run_measurements(config: Config, tasks: list[dict[str, Any]], measure: Callable[..., dict[str, Any]],
                     section: Any, storage: Path, connect: Connect) -> None:
    """Run `measure(task, section, context)` for each task on the workers `config` asks for."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    missing = [task for task in tasks if not Path(task["out"]).is_file()]
    if not missing:
        return
    connect(config)
    print(f"distdl: measuring {len(missing)} of {len(tasks)} on {config.scaling.num_workers} workers")
    trainer = TorchTrainer(
        jobs.measure_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "tasks": missing, "measure": measure, "section": section},
        scaling_config=scaling_config(config),
        run_config=RunConfig(name="measurements", storage_path=str(storage), logging_config=quiet_train_logs()),
    )
    try:
        trainer.fit()
    except Exception as err:  # a worker's failure, in one line per rank as for a training run
        raise training_failure(err, RunStorage(storage / "measurements")) from err
    still = [task["name"] for task in missing if not Path(task["out"]).is_file()]
    if still:
        raise TrainingFailed([f"the measurement job ended without results for {', '.join(still)}"])


def read_study(name: str, path: str | Path, overrides: list[str]) -> tuple[type[Study], Any, Any]:
    """The study's class, its validated section and the trials' base training config."""
    study_class = STUDIES.get(name)
    study_file = read_study_file(path, overrides)
    section = study_class.parse_section(study_file.study)
    base = config_from_dict(copy.deepcopy(study_file.training))
    if base.workload not in study_class.workloads:
        raise ConfigError(f"workload={base.workload!r}: the {name} study measures {', '.join(study_class.workloads)} "
                          "models")
    if is_uri(base.run.storage_path):
        # Its trials are Ray Tune trials whose runs read each other's results from the study directory.
        raise ConfigError(f"run.storage_path={base.run.storage_path}: a study keeps its directory on a local or "
                          "shared filesystem path; object storage is for `distdl train` runs")
    return study_class, section, base


def saved_settings(name: str, section: Any, base: Any) -> dict[str, Any]:
    return {"study": {"kind": name, **asdict(section)}, "training": base.to_dict()}


def locate_study(name: str, path: str | Path, overrides: list[str], check_dir: bool = True) -> tuple[Path, Any]:
    """The study directory and base config a `distdl study` command would use, checked as it would."""
    _, section, base = read_study(name, path, overrides)
    study_dir = Path(base.run.storage_path) / section.name
    if check_dir:
        check_study_dir(study_dir, saved_settings(name, section, base), overwrite=False)
    return study_dir, base


def check_study_dir(study_dir: Path, saved: dict[str, Any], overwrite: bool) -> None:
    """Refuse a study directory that holds another study, unless overwriting (moved aside, not deleted)."""
    saved_file = study_dir / STUDY_FILE
    if not saved_file.is_file():
        if study_dir.exists() and foreign_entries(study_dir):
            raise RunDirError(f"study directory {study_dir} exists and is not a distdl study (no {STUDY_FILE}); "
                              "choose another study.name or run.storage_path")
        return
    old = yaml.safe_load(saved_file.read_text()) or {}
    old_study = {**saved["study"], **old.get("study", {})}  # settings added since: at today's values
    differences = config_differences(old_study, saved["study"], "study.") + config_differences(
        without_session_keys(with_defaults(old.get("training", {}))), without_session_keys(saved["training"]))
    if not differences:
        return
    if not overwrite:
        listed = "\n  ".join(differences)
        raise RunDirError(f"study directory {study_dir} holds a study with other settings:\n  {listed}\n"
                          "Use another study.name, or pass --overwrite to move the old study aside.")
    print(f"distdl: moved the previous study to {move_aside(study_dir)}")


def train_trials(study: Study, trials: list[Any], base: Any, limit: Optional[int], connect: Connect) -> None:
    """Each trial is an ordinary `distdl train` run. Several at once through Ray Tune where the Ray
    cluster holds their workers side by side, one after the other otherwise."""
    connect(base)
    configs = [study.trial_config(trial) for trial in trials]
    parallel = concurrent_trials(configs, limit)
    if parallel > 1 and len(configs) > 1:
        print(f"distdl: training {len(configs)} trials, up to {parallel} at once (Ray Tune)")
        train_with_tune(configs, parallel, study.study_dir)
        return
    from tqdm import tqdm

    bar = tqdm(configs, desc="trials", unit="trial")
    for config in bar:
        bar.set_postfix_str(config.run.name)
        check_finished(config.run.name, train(config, connect))


def concurrent_trials(configs: list[Any], limit: Optional[int]) -> int:
    """How many trials' workers the cluster holds at once (CPUs and GPUs), at most `limit`."""
    import ray

    available = ray.cluster_resources()
    fits = []
    for config in configs:
        scaling = config.scaling
        cpus = available.get("CPU", 0) // (scaling.num_workers * scaling.cpus_per_worker)
        gpus = available.get("GPU", 0) // scaling.num_workers if scaling.use_gpu else cpus
        fits.append(int(min(cpus, gpus)))
    parallel = max(1, min(fits))
    return min(parallel, limit) if limit else parallel


def train_with_tune(configs: list[Any], parallel: int, study_dir: Path) -> None:
    from ray import tune

    tuner = tune.Tuner(
        # The trial function only drives its TorchTrainer, whose workers hold the CPUs and GPUs;
        # Tune needs some resource per trial, so it reserves the driver's memory.
        tune.with_resources(tune_trial, {"memory": 256 * 2**20}),
        param_space={"config": tune.grid_search([config.to_dict() for config in configs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=parallel),
        run_config=tune.RunConfig(name="trials", storage_path=str(study_dir / "ray"), verbose=1),
    )
    results = tuner.fit()
    failed = [str(result.error).strip().splitlines()[-1] for result in results if result.error]
    if failed:
        raise TrainingFailed([f"{len(failed)} of {len(results)} trials failed:", *failed])


def tune_trial(tune_config: dict[str, Any]) -> None:
    from ray import tune

    config = config_from_dict(tune_config["config"])
    summary = train(config, already_connected)  # a Tune trial runs inside Ray
    check_finished(config.run.name, summary)
    tune.report({"steps": summary.get("steps", 0)})


def check_finished(name: str, summary: dict[str, Any]) -> None:
    """A trial that diverged or stopped early fails the study in one line (exit status 1), as a run does."""
    if summary.get("non_finite_step") is not None:
        raise TrainingFailed([f"trial {name} diverged: its loss or gradient norm was not finite at step "
                              f"{summary['non_finite_step']}; lower its learning rate (or batch size) in the study"])
    if not summary.get("completed", True):
        raise TrainingFailed([f"trial {name} stopped before its last step; run the study again to go on"])


def log_to_wandb(report: StudyReport, group: str, base: Any, study_dir: Path) -> None:
    """One W&B run for the study, in the trials' group: the plots as images, the results as a table."""
    from distdl.tracking import resolve_wandb_mode, scalar_entries

    mode = resolve_wandb_mode(base.tracking.wandb_mode)
    if mode == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project=base.tracking.wandb_project, entity=base.tracking.wandb_entity, group=group,
                         name=f"{group}-report", id=f"study-{group}"[:64], resume="allow", job_type="study",
                         dir=str(study_dir), mode=mode)
        run.log({name: wandb.Image(str(path)) for name, path in report.plots.items()})
        if report.table is not None:
            run.log({"results": wandb.Table(dataframe=report.table)})
        run.summary.update(dict(scalar_entries(report.summary)))
        run.finish()
    except Exception as err:  # W&B must never lose a finished study
        warnings.warn(f"W&B logging of the study failed ({err}); the report is in {study_dir}")


def print_summary(study_dir: Path, report: StudyReport) -> None:
    print(f"distdl: study written to {study_dir}: {REPORT_FILE}, {RESULTS_FILE}, "
          + ", ".join(path.name for path in report.plots.values()))
    print(json.dumps(report.summary, indent=1, default=str)[:2000])
