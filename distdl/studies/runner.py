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

from distdl import provenance
from distdl.config import Config, config_from_dict
from distdl.driver import Connect, quiet_train_logs, scaling_config, train, training_failure
from distdl.errors import ConfigError, TrainingFailed
from distdl.registry import STUDIES, WORKLOADS
from distdl.rundir import RunStorage, is_uri, write_json
from distdl.studies import jobs
from distdl.studies.base import REPORT_FILE, RESULTS_FILE, STUDY_FILE, Study, StudyReport, read_study_file
from distdl.tuning import check_finished, check_trials_dir, concurrent_trials, train_configs_with_tune


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
        train_trials(study, later, base, section.max_concurrent_trials, connect, "later-trials")
        trials = trials + later
    run_measurements(base, study.measure_tasks(trials), study_class.measure, section, study_dir / "ray", connect)
    report = study.write_report(trials)
    write_json(study_dir / RESULTS_FILE, {**report.results, "provenance": provenance.record()})
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
    check_trials_dir(study_dir, STUDY_FILE, "study", saved, overwrite)


def train_trials(study: Study, trials: list[Any], base: Any, limit: Optional[int], connect: Connect,
                 experiment: str = "trials") -> None:
    """Each trial is an ordinary `distdl train` run. Several at once through Ray Tune where the Ray
    cluster holds their workers side by side, one after the other otherwise."""
    connect(base)
    configs = [study.trial_config(trial) for trial in trials]
    parallel = concurrent_trials(configs, limit)
    if parallel > 1 and len(configs) > 1:
        print(f"distdl: training {len(configs)} trials, up to {parallel} at once (Ray Tune)")
        train_configs_with_tune(configs, parallel, study.study_dir / "ray", experiment)
        return
    from tqdm import tqdm

    bar = tqdm(configs, desc="trials", unit="trial")
    for config in bar:
        bar.set_postfix_str(config.run.name)
        check_finished(config.run.name, train(config, connect))


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
