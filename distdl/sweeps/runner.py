"""`distdl sweep CONFIG [key=value ...] [--sweep FILE]`: a hyperparameter search on Ray Tune.

Every trial is an ordinary distdl run in `<run.storage_path>/<sweep.name>/trials/`, whose Ray Train
job runs inside its Tune trial, several side by side where the cluster holds them. Each evaluation
reports to Tune as it happens, so ASHA stops the worst trials mid-run. Tune's own experiment state
is `<sweep dir>/tune/`; the same command after a crash resumes it (finished trials kept, unfinished
ones resumed from their checkpoints). The sweep ends with results.json, report.md and plots.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import yaml

from distdl import provenance
from distdl.config import PATH_KEYS, Config, config_from_dict, read_yaml, set_dotted, split_section
from distdl.driver import Connect
from distdl.errors import ConfigError
from distdl.registry import WORKLOADS
from distdl.rundir import is_uri, write_json
from distdl.sweeps.report import LINEAGE, SweepReport, sweep_report
from distdl.sweeps.section import (
    SWEEP_KEY,
    Dimension,
    SweepSection,
    parse_sweep,
    population,
    search_algorithm,
    search_space,
    trial_name,
    trial_scheduler,
)
from distdl.tuning import (
    TRIAL_DRIVER_RESOURCES,
    check_trials_dir,
    concurrent_trials,
    raise_failures,
    run_trial,
    trials_that_fit,
)

SWEEP_FILE = "sweep.yaml"
EXPERIMENT = "tune"
# Tune keeps this many copies of each PBT trial's latest checkpoints: the one another trial is about
# to continue from stays while its owner trains on (Tune warns that 2 or fewer may not).
TUNE_CHECKPOINTS_KEPT = 3


def run_sweep(config_path: str | Path, overrides: list[str], sweep_file: Optional[str | Path], overwrite: bool,
              connect: Connect) -> tuple[Path, SweepReport]:
    section, dimensions, training = read_sweep(config_path, overrides, sweep_file)
    base = config_from_dict(copy.deepcopy(training))
    sweep_dir = Path(base.run.storage_path) / section.name
    saved = {"sweep": asdict(section), "training": base.to_dict()}
    check_trials_dir(sweep_dir, SWEEP_FILE, "sweep", saved, overwrite)
    connect(base)
    check_placement(section, dimensions, base)
    WORKLOADS.get(base.workload).prepare(base)  # once, before trials prepare side by side
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    results = fit(section, dimensions, base, training, sweep_dir)
    report = sweep_report(results, section, dimensions, sweep_dir)
    write_json(sweep_dir / "results.json", {**report.results, "provenance": provenance.record()})
    (sweep_dir / "report.md").write_text(report.markdown)
    raise_failures(results, lambda result: f"{result.path}: ")
    return sweep_dir, report


def read_sweep(config_path: str | Path, overrides: list[str],
               sweep_file: Optional[str | Path]) -> tuple[SweepSection, list[Dimension], dict[str, Any]]:
    """The validated sweep section, its search space and the trials' training config as written
    (each trial sets its values on it; derived values such as gradient accumulation follow them)."""
    raw = read_yaml(config_path)
    if sweep_file is not None:
        if SWEEP_KEY in raw:
            raise ConfigError(f"{config_path} has a '{SWEEP_KEY}:' section and --sweep {sweep_file} gives another; "
                              "keep one")
        own = read_yaml(sweep_file)
        if set(own) != {SWEEP_KEY}:
            raise ConfigError(f"--sweep {sweep_file} must hold only a '{SWEEP_KEY}:' section; it has "
                              f"{', '.join(sorted(own))}")
        raw[SWEEP_KEY] = own[SWEEP_KEY]
    values, training = split_section(raw, SWEEP_KEY, overrides)
    if not isinstance(values, dict):
        raise ConfigError(f"{config_path} has no '{SWEEP_KEY}:' section: add one, or give it with --sweep FILE")
    base = config_from_dict(copy.deepcopy(training))
    if is_uri(base.run.storage_path):
        raise ConfigError(f"run.storage_path={base.run.storage_path}: a sweep keeps its directory on a local or "
                          "shared filesystem path; object storage is for `distdl train` runs")
    section, dimensions = parse_sweep(values, training)
    return section, dimensions, with_absolute_paths(training, base)


def with_absolute_paths(training: dict[str, Any], base: Config) -> dict[str, Any]:
    """The training config with its local paths made absolute as `base` has them: a Tune trial runs
    in a directory of its own."""
    resolved = base.to_dict()
    for dotted in PATH_KEYS + WORKLOADS.get(base.workload).path_keys:
        section, key = dotted.split(".")
        value = (resolved.get(section) or {}).get(key)
        if value is not None:
            set_dotted(training, dotted, value)
    return training


def check_placement(section: SweepSection, dimensions: list[Dimension], base: Config) -> None:
    """Refuse, before any trial starts, a sweep whose trials the Ray cluster cannot place as asked."""
    import ray

    fits = trials_that_fit(base)
    scaling = base.scaling
    needs = (f"scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker={scaling.cpus_per_worker} CPUs"
             + (" and a GPU each" if scaling.use_gpu else ""))
    if fits == 0:
        raise ConfigError(f"a trial needs {needs}; the Ray cluster has {ray.cluster_resources()}: no trial fits")
    if section.max_concurrent_trials and section.max_concurrent_trials > fits:
        raise ConfigError(f"sweep.max_concurrent_trials={section.max_concurrent_trials}: the Ray cluster holds "
                          f"{fits} trial(s) of {needs} at once; lower it, or null for as many as fit")
    side_by_side = min(fits, section.max_concurrent_trials or fits)
    if section.scheduler == "pbt" and population(section, dimensions) > side_by_side:
        # A trial waiting for a place would let the checkpoint it is to continue from be deleted.
        raise ConfigError(f"sweep.scheduler=pbt trains its population side by side: {population(section, dimensions)} "
                          f"trials, but {side_by_side} fit at once ({needs} each); lower sweep.samples or the grid, "
                          "or add workers to the Ray cluster")


def fit(section: SweepSection, dimensions: list[Dimension], base: Config, training: dict[str, Any],
        sweep_dir: Path) -> Any:
    """Tune's results, one per trial: a new experiment, or the one a previous command left unfinished."""
    from ray import tune

    pbt = section.scheduler == "pbt"
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, base=training, sweep_dir=str(sweep_dir), pbt=pbt),
                                    TRIAL_DRIVER_RESOURCES)
    experiment = sweep_dir / EXPERIMENT
    # Tune's advice for class trainables that reset in place; a distdl trial starts a new run instead.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance by enabling `reuse_actors`")
    if tune.Tuner.can_restore(str(experiment)):
        print(f"distdl: resuming the sweep's trials from {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:
        parallel = concurrent_trials([base], section.max_concurrent_trials)
        print(f"distdl: sweep {section.name}: up to {parallel} trials at once, ranked by {section.metric} "
              f"({section.mode}), search {section.search}, scheduler {section.scheduler}")
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(dimensions),
            tune_config=tune.TuneConfig(num_samples=section.samples, metric=section.metric, mode=section.mode,
                                        search_alg=search_algorithm(section, base.run.seed),
                                        scheduler=trial_scheduler(section, dimensions),
                                        max_concurrent_trials=parallel),
            # PBT: Tune's copies of each trial's checkpoints, which other trials continue from.
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(sweep_dir), verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=TUNE_CHECKPOINTS_KEPT if pbt
                                                                              else None)),
        )
    return tuner.fit()


def sweep_trial(values: dict[str, Any], base: dict[str, Any], sweep_dir: str, pbt: bool = False) -> None:
    """One Tune trial: the base config with the trial's values, as a run named after them. Under PBT,
    a trial Tune restarts from a checkpoint (another trial's, which it clones, or its own after a
    crash) continues from it as a new run named after the step it starts at."""
    from ray import tune

    raw = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(raw, key, value)
    checkpoint = tune.get_checkpoint() if pbt else None
    origin = checkpoint.get_metadata() if checkpoint is not None else {}
    name = trial_name(tune.get_context().get_trial_id(), values, origin.get("step"))
    set_dotted(raw, "run.name", name)
    set_dotted(raw, "run.storage_path", str(Path(sweep_dir) / "trials"))
    set_dotted(raw, "tracking.wandb_group", Path(sweep_dir).name)
    if checkpoint is not None:
        write_json(Path(sweep_dir) / LINEAGE / f"{name}.json", {**origin, "values": values})
    run_trial(config_from_dict(raw), checkpoints_to_tune=pbt,
              start_from=Path(checkpoint.path) if checkpoint is not None else None)
