"""What `distdl plan` reads besides the cluster file: a short measured run (`--profile`) and a finished
scaling study (`--scaling`). Each is checked against the config being planned; every error names
the file and the key."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from distdl.config import Config, config_from_dict, load_config, read_yaml
from distdl.errors import ConfigError
from distdl.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary, saved_config
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
    trainable_parameters: int
    samples_per_s: float  # the median of the logged windows after the first (the first holds the warm-up)
    windows: int
    mfu: Optional[float]
    flops_per_sample: Optional[float]
    device: Optional[str]  # where the peak FLOP/s came from, which names the device

    @property
    def step_s(self) -> float:
        return self.global_batch / self.samples_per_s

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)


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


def read_profile(run_dir: str | Path, planned: Config) -> Profile:
    """A finished (or stopped) run of the planned model: its throughput, batch and parameters."""
    run_dir = Path(run_dir)
    saved = saved_config(run_dir, key="--profile")
    profiled = config_from_dict(saved)
    check_same_model(planned, profiled, f"--profile {run_dir / CONFIG_FILE}",
                     "profile a short run of the planned config (distdl train CONFIG trainer.max_steps=50)")
    summary = read_summary(run_dir)
    if not summary:
        raise ConfigError(f"--profile {run_dir}: no {SUMMARY_FILE}; the run has not ended a session yet")
    rates = [m["samples_per_s"] for m in read_metrics(run_dir) if m.get("samples_per_s")]
    if len(rates) < 2:
        raise ConfigError(f"--profile {run_dir / METRICS_FILE}: samples_per_s was logged {len(rates)} time(s); "
                          "a profile needs 2 log steps at least (the first holds the warm-up): run more steps, "
                          "or lower trainer.log_every")
    usage = summary.get("utilization") or {}
    flops_per_step = usage.get("flops_per_step")
    trainer = profiled.trainer
    return Profile(
        run_dir=run_dir, world_size=int(summary["world_size"]), micro_batch=trainer.micro_batch_size,
        global_batch=trainer.global_batch_size, precision=profiled.engine.precision,
        trainable_parameters=sum(summary["trainable_parameters"].values()),
        samples_per_s=statistics.median(rates[1:]), windows=len(rates) - 1, mfu=usage.get("mean_mfu"),
        flops_per_sample=flops_per_step / trainer.global_batch_size if flops_per_step else None,
        device=usage.get("peak_source"))


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
    settings = yaml.safe_load(settings_file.read_text())
    if settings.get("study", {}).get("kind") != "scaling":
        raise ConfigError(f"--scaling {settings_file}: study.kind={settings.get('study', {}).get('kind')!r}; "
                          "allowed: scaling (a `distdl study scaling` directory)")
    check_same_model(planned, config_from_dict(settings["training"]), f"--scaling {settings_file}",
                     "steps to a target loss carry over only within one model and data")
    results = json.loads(results_file.read_text())
    fits = results.get("by_optimizer", {})
    name = planned.optimizer.name
    if name not in fits:
        raise ConfigError(f"--scaling {results_file}: no fit for optimizer.name={name!r}; the study fitted "
                          f"{', '.join(fits) or 'nothing'}")
    fit = fits[name]
    if "critical_batch_size" not in fit:
        raise ConfigError(f"--scaling {results_file}: by_optimizer.{name} has no critical_batch_size: fewer than "
                          f"two of its batch sizes reached study.target_loss={settings['study']['target_loss']}; "
                          "raise study.max_steps or the target loss, and run the study again")
    batches = sorted({row["batch_size"] for row in results.get("entries", [])
                      if row.get("optimizer") == name and row.get("steps_to_target") is not None})
    return ScalingInput(study_dir=study_dir, optimizer=name, min_steps=fit["min_steps"],
                        critical_batch=fit["critical_batch_size"], noise_scale_batch=fit.get("noise_scale_batch"),
                        target_loss=settings["study"]["target_loss"], measured_batches=batches,
                        beyond_measured_batches=bool(fit.get("beyond_measured_batches")))


def gradient_bytes(parameters: int, precision: str) -> float:
    return float(parameters * GRADIENT_BYTES[precision])
