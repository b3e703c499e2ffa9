"""What `distdl plan` reads besides the cluster file: a short measured run (`--profile`) and a finished
scaling study (`--scaling`). Each is checked against the config being planned; every error names
the file and the key."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from distdl.config import Config, config_from_dict, load_config, read_yaml
from distdl.errors import ConfigError
from distdl.planning.trace import StepTrace, read_step_trace
from distdl.profiling import trace_files
from distdl.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_json_object, read_metrics, saved_config
from distdl.studies.base import RESULTS_FILE, STUDY_FILE, STUDY_KEY, read_study_file

# What sets the compute of one sample besides the model section: the text and image sizes.
SHAPE_KEYS = ("max_seq_length", "image_size", "crop_size")
# Bytes per gradient element as it is communicated: DeepSpeed reduces in the compute precision.
GRADIENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Profile:
    """One measured run, reduced to what the step model needs."""

    run_dir: Path
    world_size: int
    micro_batch: int
    global_batch: int
    precision: str
    zero_stage: int
    trainable_parameters: int
    samples_per_s: float  # the median of the logged windows after the first (the first holds the warm-up)
    windows: int
    mfu: Optional[float]
    flops_per_sample: Optional[float]
    device: Optional[str]  # where the peak FLOP/s came from, which names the device
    trace: Optional[StepTrace] = None  # rank 0's trace of trainer.profile_steps, where the run took one

    @property
    def step_s(self) -> float:
        return self.global_batch / self.samples_per_s

    @property
    def samples_per_worker(self) -> int:
        return self.global_batch // self.world_size


def is_study_file(path: str | Path) -> bool:
    return STUDY_KEY in read_yaml(path)


def planned_config(path: str | Path, overrides: list[str]) -> Config:
    """The training config to plan: a training config file, or a study file's training part (its
    study: section and study.* overrides set trials, not the model)."""
    if is_study_file(path):
        return config_from_dict(read_study_file(path, overrides).training)
    return load_config(path, overrides)


def model_identity(config: Config) -> dict[str, Any]:
    """What must agree between a profile and the config planned for the profile's compute to carry over."""
    identity: dict[str, Any] = {"workload": config.workload, "engine.precision": config.engine.precision}
    identity.update({f"model.{key}": value for key, value in asdict(config.sections["model"]).items()})
    data = asdict(config.sections["data"]) if "data" in config.sections else {}
    identity.update({f"data.{key}": data[key] for key in SHAPE_KEYS if key in data})
    return identity


def check_same_model(planned: Config, other: Config, source: str, advice: str) -> None:
    mine, theirs = model_identity(planned), model_identity(other)
    differing = [key for key in mine if mine[key] != theirs.get(key)]
    if differing:
        key = differing[0]
        also = f" (these differ too: {', '.join(differing[1:])})" if differing[1:] else ""
        raise ConfigError(f"{source}: {key}={theirs.get(key)!r}, but the config planned has {key}={mine[key]!r}"
                          f"{also}; {advice}")


def required(values: dict[str, Any], key: str, path: Path, flag: str) -> Any:
    if key not in values:
        raise ConfigError(f"{flag} {path}: no {key!r}; it was written by another distdl version or cut short")
    return values[key]


def config_of(values: dict[str, Any], path: Path, flag: str) -> Config:
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{flag} {path}: {err}") from None


def read_profile(run_dir: str | Path, planned: Config) -> Profile:
    """A finished (or stopped) run of the planned model: its throughput, batch and parameters."""
    run_dir = Path(run_dir)
    profiled = config_of(saved_config(run_dir, key="--profile"), run_dir / CONFIG_FILE, "--profile")
    check_same_model(planned, profiled, f"--profile {run_dir / CONFIG_FILE}",
                     "profile a short run of the planned config (distdl train CONFIG trainer.max_steps=50)")
    summary_file = run_dir / SUMMARY_FILE
    if not summary_file.is_file():
        raise ConfigError(f"--profile {run_dir}: no {SUMMARY_FILE}; the run has not ended a session yet")
    summary = read_json_object(summary_file, "--profile")
    world = int(required(summary, "world_size", summary_file, "--profile"))
    parameters = required(summary, "trainable_parameters", summary_file, "--profile")
    trainer = profiled.trainer
    if trainer.global_batch_size % (trainer.micro_batch_size * world):
        raise ConfigError(f"--profile {summary_file}: world_size={world} does not split "
                          f"{run_dir / CONFIG_FILE}'s trainer.global_batch_size={trainer.global_batch_size} into "
                          f"micro-batches of {trainer.micro_batch_size}; the two files are not of one run")
    rates = [m["samples_per_s"] for m in read_metrics(run_dir) if m.get("samples_per_s")]
    if len(rates) < 2:
        raise ConfigError(f"--profile {run_dir / METRICS_FILE}: samples_per_s was logged {len(rates)} time(s); "
                          "a profile needs 2 log steps at least (the first holds the warm-up): run more steps, "
                          "or lower trainer.log_every")
    usage = summary.get("utilization") or {}
    flops_per_step = usage.get("flops_per_step")
    return Profile(
        run_dir=run_dir, world_size=world, micro_batch=trainer.micro_batch_size,
        global_batch=trainer.global_batch_size, precision=profiled.engine.precision,
        zero_stage=profiled.engine.zero_stage,
        trainable_parameters=sum(parameters.values()) if isinstance(parameters, dict) else int(parameters),
        samples_per_s=statistics.median(rates[1:]), windows=len(rates) - 1, mfu=usage.get("mean_mfu"),
        flops_per_sample=flops_per_step / trainer.global_batch_size if flops_per_step else None,
        device=usage.get("peak_source"), trace=rank_zero_trace(run_dir, world))


def rank_zero_trace(run_dir: Path, world_size: int) -> Optional[StepTrace]:
    """Rank 0's trace of the run's trainer.profile_steps (the latest steps traced, where sessions
    traced several), checked to come from a session of the summary's world size."""
    traces = trace_files(run_dir, rank=0)
    if not traces:
        return None
    trace = read_step_trace(traces[-1])
    if trace.world_size is not None and trace.world_size != world_size:
        raise ConfigError(f"--profile {trace.path}: traced on {trace.world_size} workers, but "
                          f"{run_dir / SUMMARY_FILE} has world_size={world_size}: the trace is of another session; "
                          "move it out of the run's profiles/ folder, or profile again")
    return trace


@dataclass(frozen=True)
class ScalingInput:
    """A scaling study's fit for the planned optimizer: S(B) = S_min (1 + B_crit / B) to its target loss."""

    study_dir: Path
    optimizer: str
    min_steps: float
    critical_batch: float
    noise_scale_batch: Optional[float]
    target_loss: float
    measured_batches: list[int]
    beyond_measured_batches: bool


def read_scaling(study_dir: str | Path, planned: Config) -> ScalingInput:
    study_dir = Path(study_dir)
    results_file, settings_file = study_dir / RESULTS_FILE, study_dir / STUDY_FILE
    for needed in (settings_file, results_file):
        if not needed.is_file():
            raise ConfigError(f"--scaling {study_dir}: no {needed.name}; give the directory of a finished "
                              "`distdl study scaling` (its report.md and results.json)")
    try:
        settings = read_yaml(settings_file)
    except ConfigError as err:
        raise ConfigError(f"--scaling: {err}") from None
    study = settings.get(STUDY_KEY)
    if not isinstance(study, dict) or study.get("kind") != "scaling":
        kind = study.get("kind") if isinstance(study, dict) else None
        raise ConfigError(f"--scaling {settings_file}: study.kind={kind!r}; allowed: scaling (a `distdl study "
                          "scaling` directory)")
    trained = config_of(required(settings, "training", settings_file, "--scaling"), settings_file, "--scaling")
    check_same_model(planned, trained, f"--scaling {settings_file}",
                     "steps to a target loss carry over only within one model and data")
    results = read_json_object(results_file, "--scaling")
    # Studies from before study.optimizers keep their one fit at the top level, for the config's optimizer.
    fits = results.get("by_optimizer") or {trained.optimizer.name: results}
    name = planned.optimizer.name
    if name not in fits:
        raise ConfigError(f"--scaling {results_file}: no fit for optimizer.name={name!r}; the study fitted "
                          f"{', '.join(fits) or 'nothing'}")
    fit = fits[name]
    if "critical_batch_size" not in fit or "min_steps" not in fit:
        raise ConfigError(f"--scaling {results_file}: by_optimizer.{name} has no critical_batch_size: fewer than "
                          f"two of its batch sizes reached study.target_loss={study.get('target_loss')}; "
                          "raise study.max_steps or the target loss, and run the study again")
    # A batch whose runs never reached the target has NaN steps in results.json (pandas' missing value).
    batches = sorted({row["batch_size"] for row in results.get("entries", [])
                      if row.get("optimizer", name) == name and is_number(row.get("steps_to_target"))})
    return ScalingInput(study_dir=study_dir, optimizer=name, min_steps=fit["min_steps"],
                        critical_batch=fit["critical_batch_size"], noise_scale_batch=fit.get("noise_scale_batch"),
                        target_loss=study["target_loss"], measured_batches=batches,
                        beyond_measured_batches=bool(fit.get("beyond_measured_batches")))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def gradient_bytes(parameters: int, precision: str) -> float:
    return float(parameters * GRADIENT_BYTES[precision])
