"""What a study is: its own `study:` config section, the trials it trains, what it measures on the
trained solutions (on the Ray Train workers), and the report it writes from the measurements.

A study file is an ordinary distdl training config plus a `study:` section. Command-line overrides
`study.*` go to the study; every other key goes to the training config, exactly as for `distdl train`.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

from annotated_types import Ge, Gt

if TYPE_CHECKING:
    import torch

from distdl.config import (
    AtLeastOne,
    Config,
    Finite,
    Requirement,
    build_section,
    config_from_dict,
    read_yaml,
    resolve_epochs,
    set_dotted,
    split_section,
)
from distdl.engine.checkpoints import trained_state
from distdl.errors import ConfigError
from distdl.registry import WORKLOADS
from distdl.rundir import read_metrics
from distdl.workloads.base import WorkerContext, Workload

STUDY_KEY = "study"
# What a study directory holds besides its trials: the settings it ran with, its results and report.
STUDY_FILE = "study.yaml"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
# What a study measured on one trial's solution, in the trial's run directory.
MEASUREMENTS_FILE = "measurements.json"


@dataclass
class StudySection:
    """Settings every study has; each study's section extends it."""

    # The study directory's name, under the training config's run.storage_path.
    name: str = "study"
    # Trials trained at once through Ray Tune; null: as many as the Ray cluster holds side by side.
    max_concurrent_trials: Optional[Annotated[int, Ge(1), Requirement(
        "must be at least 1 (or null: as many as the cluster holds)")]] = None


@dataclass
class LossTarget:
    """For an equal_loss protocol: every trial trains until its window-mean training loss reaches
    target_loss (trainer.stop_at_loss), within max_steps."""

    target_loss: Optional[Annotated[float, Gt(0), Finite]] = None
    max_steps: AtLeastOne = 5000

    def loss_budget(self) -> dict[str, Any]:
        return {"trainer.max_steps": self.max_steps, "trainer.stop_at_loss": self.target_loss, "trainer.epochs": None}

    def reached(self, run_dir: Path, budget: int) -> dict[str, Any]:
        """The steps a trial took to the target (its whole budget if it never got there), and whether it did."""
        steps = steps_to_target(run_dir, self.target_loss)
        return {"steps": steps or budget, "reached_target": steps is not None}


def steps_to_target(run_dir: Path, target: float) -> Optional[int]:
    """The first logged step whose window-mean training loss is at or below the target. The window
    (trainer.log_every steps) smooths the loss: with a window of one step, a single lucky small
    batch crossed the target at a quarter of the steps a 5-step window gave."""
    for record in read_metrics(run_dir):
        if "loss" in record and record["loss"] <= target:
            return int(record["step"])
    return None


@dataclass
class Trial:
    """One training run of a study: its name (its run directory's) and what it changes in the base config."""

    name: str
    overrides: dict[str, Any]
    # What the study keeps about the trial besides the measurements (batch size, seed, protocol, ...).
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyFile:
    study: dict[str, Any]
    training: dict[str, Any]


def read_study_file(path: str | Path, overrides: list[str]) -> StudyFile:
    raw = read_yaml(path)
    if not isinstance(raw.get(STUDY_KEY), dict):
        raise ConfigError(f"study file {path} needs a '{STUDY_KEY}:' section (the study's settings) next to the "
                          "training config")
    study, training = split_section(raw, STUDY_KEY, overrides)
    return StudyFile(study, training)


def check_sweep(key: str, values: list[int], what: str) -> None:
    """A list of distinct values of at least 1, with at least one in it (batch sizes, widths, workers)."""
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{key}={values} must list {what} of at least 1")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}={values} lists a value twice")


def per_worker(batch: int, workers: int) -> int:
    """A global batch's share per worker; a batch that does not split evenly is named."""
    if batch % workers:
        raise ConfigError(f"study.batch_sizes: {batch} does not split evenly over scaling.num_workers={workers}")
    return batch // workers


def batch_overrides(batch: int, workers: int) -> dict[str, Any]:
    """A trial's keys for a global batch of `batch` on `workers`, each with an even share and no
    gradient accumulation."""
    return {"trainer.global_batch_size": batch, "trainer.micro_batch_size": per_worker(batch, workers),
            "trainer.gradient_accumulation_steps": None}


def epoch_steps(base: dict[str, Any], batch: int, workers: int, train_examples: int) -> int:
    """Optimizer steps for the base config's `trainer.epochs` at this global batch, as the driver
    would count them."""
    raw = copy.deepcopy(base)
    for key, value in {**batch_overrides(batch, workers), "trainer.max_steps": None}.items():
        set_dotted(raw, key, value)
    config = config_from_dict(raw)
    resolve_epochs(config, train_examples)
    return config.trainer.max_steps


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise ConfigError("study.seeds is empty; give at least one seed")


class Study(ABC):
    """Subclasses register with `@STUDIES.register(name)` and give their section's dataclass."""

    section_class: type
    # Training workloads whose models the study can measure.
    workloads: tuple[str, ...] = ("resnet",)

    def __init__(self, section: Any, base: dict[str, Any], study_dir: Path) -> None:
        self.section, self.base, self.study_dir = section, base, study_dir

    @classmethod
    def parse_section(cls, values: dict[str, Any]) -> Any:
        section = build_section(cls.section_class, values, STUDY_KEY)
        if not getattr(section, "name", None) or "/" in section.name:
            raise ConfigError(f"study.name={getattr(section, 'name', None)!r} must be a non-empty name without '/'")
        cls.validate(section)
        return section

    @classmethod
    def validate(cls, section: Any) -> None:
        """Checks of the study's own settings; raise ConfigError naming the key."""

    def trial_config(self, trial: Trial) -> Config:
        raw = copy.deepcopy(self.base)
        for key, value in trial.overrides.items():
            set_dotted(raw, key, value)
        set_dotted(raw, "run.name", trial.name)
        set_dotted(raw, "run.storage_path", str(self.study_dir / "trials"))
        set_dotted(raw, "tracking.wandb_group", self.section.name)
        try:
            return config_from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"trial {trial.name}: {err}") from err

    @abstractmethod
    def trials(self, train_examples: int) -> list[Trial]:
        """The runs to train, given the training set's size."""

    def later_trials(self, trials: list[Trial]) -> list[Trial]:
        """Runs whose settings come from the trained `trials` (trained after them); none by default."""
        return []

    @abstractmethod
    def measure_tasks(self, trials: list[Trial]) -> list[dict[str, Any]]:
        """What to measure on the workers: picklable dicts with a `name` and an `out` file; the
        study's `measure` gets each on every rank."""

    @staticmethod
    @abstractmethod
    def measure(task: dict[str, Any], section: Any, context: Any) -> dict[str, Any]:
        """Run on every rank of the measurement job; rank 0's return value is saved to task['out']."""

    @abstractmethod
    def write_report(self, trials: list[Trial]) -> "StudyReport":
        """results.json entries, report.md and plots, from the trials' measurements."""


@dataclass
class StudyReport:
    # results.json: {"entries": one per trial (or per trial and protocol), ...the study's fits}
    results: dict[str, Any]
    markdown: str
    plots: dict[str, Path]
    summary: dict[str, Any] = field(default_factory=dict)
    table: Optional[Any] = None  # a pandas DataFrame for W&B


def trained_workload(trial_config: dict[str, Any], context: WorkerContext) -> tuple[Workload, torch.nn.Module]:
    """A trial's workload with augmentation off (the loss is a fixed function of the weights), and
    its model with the trial's final weights, in eval mode (batch norm uses its running statistics)."""
    config = config_from_dict(trial_config)
    sections = dict(config.sections)
    if dataclasses.is_dataclass(sections.get("data")) and hasattr(sections["data"], "augment"):
        sections["data"] = dataclasses.replace(sections["data"], augment=False)
    workload = WORKLOADS.get(config.workload)(sections, context)
    model = workload.build_model()
    model.load_state_dict(trained_state(config.run_dir).weights())
    return workload, model.to(context.device).eval()
