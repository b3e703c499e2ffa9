"""`distdl study temperature`: does SGD's temperature, learning rate over batch size, set the solution
it finds? (Jastrzebski et al. 2017; Smith & Le 2018.)

Trains the study file's model on a grid of learning rates x batch sizes (and seeds), at its own
learning rate (no batch scaling rule): each for the config's `trainer.epochs` (equal_epochs), or
each until its training loss reaches `study.target_loss` (equal_loss: at equal epochs lr/B also
fixes how far SGD travels, steps x lr, so there a cooler cell is also a less trained one). It measures every
solution as the sharpness study does: test accuracy, epsilon-sharpness, adaptive sharpness, the top
Hessian eigenvalue and the trace. If SGD's noise scale lr/B is what matters, each measure is a
function of lr/B alone: its contours over (lr, B) follow lines of constant lr/B. The report fits
measure ~ f(lr / B^k) for each measure and gives k with its interval; Smith & Le predict k = 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import Ge, Gt

from distdl.config import Finite, Requirement, config_from_dict, noise_scale_possible
from distdl.errors import ConfigError
from distdl.figures import markdown_sections
from distdl.registry import STUDIES
from distdl.studies import plots
from distdl.studies.base import (
    MEASUREMENTS_FILE,
    LossTarget,
    Study,
    StudyReport,
    Trial,
    batch_overrides,
    check_seeds,
    check_sweep,
    epoch_steps,
)
from distdl.studies.plots import eps_name
from distdl.studies.solutions import MeasurementSection, measure_solution, measured_solution

# Candidate exponents k, and the profile-likelihood threshold of a 95% interval (chi-squared, 1 dof).
EXPONENTS = np.linspace(-1.0, 3.0, 401)
CHI2_95 = 3.841


@dataclass
class TemperatureSection(MeasurementSection, LossTarget):
    name: str = "temperature"
    learning_rates: list[Annotated[float, Gt(0), Finite]] = field(default_factory=lambda: [0.01, 0.03, 0.1])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128, 512])
    seeds: list[int] = field(default_factory=lambda: [0])
    # equal_epochs: every cell trains trainer.epochs; equal_loss: every cell trains until its window-mean
    # training loss reaches target_loss (trainer.stop_at_loss), within max_steps.
    protocol: Literal["equal_epochs", "equal_loss"] = "equal_epochs"
    # One pass over the measurement set per point, for every cell of the grid: off unless asked for.
    landscape_points: Annotated[int, Ge(0), Requirement("must be 0 (skip) or more")] = 0
    landscape_grid: Annotated[int, Ge(0), Requirement("must be 0 (skip) or more")] = 0


@STUDIES.register("temperature")
class TemperatureStudy(Study):
    section_class = TemperatureSection

    @classmethod
    def validate(cls, section: TemperatureSection) -> None:
        check_sweep("study.batch_sizes", section.batch_sizes, "batch sizes")
        check_seeds(section.seeds)
        for key, values in (("study.learning_rates", section.learning_rates), ("study.batch_sizes", section.batch_sizes)):
            if len(set(values)) < 2:
                raise ConfigError(f"{key}={values} must hold two values or more: the study separates lr/B from lr "
                                  "and B alone, which a grid with one point along either cannot")
        if len(set(section.learning_rates)) != len(section.learning_rates):
            raise ConfigError(f"study.learning_rates={section.learning_rates} lists a value twice")
        if section.protocol == "equal_loss" and section.target_loss is None:
            raise ConfigError("study.protocol=equal_loss trains every cell to the same training loss: set "
                              "study.target_loss")

    def trials(self, train_examples: int) -> list[Trial]:
        base = config_from_dict(self.base)
        workers = base.scaling.num_workers
        section = self.section
        if base.trainer.epochs is None and section.protocol == "equal_epochs":
            raise ConfigError("the temperature study trains every cell for the same epochs: set trainer.epochs "
                              "(and not trainer.max_steps) in the training config, or study.protocol=equal_loss")
        noise = noise_scale_possible(base)
        trials = []
        for lr in section.learning_rates:
            for batch in sorted(section.batch_sizes):
                if section.protocol == "equal_loss":
                    steps, budget, suffix = section.max_steps, section.loss_budget(), f"loss{section.target_loss:g}"
                else:
                    steps, budget = epoch_steps(self.base, batch, workers, train_examples), {}
                    suffix = f"steps{steps}"
                for seed in section.seeds:
                    trials.append(Trial(f"lr{lr:g}-batch{batch}-seed{seed}-{suffix}", {
                        **batch_overrides(batch, workers), "trainer.max_steps": steps, "optimizer.lr": lr, "optimizer.reference_batch_size": None, "run.seed": seed,
                        "trainer.noise_scale": noise, **budget,
                    }, {"lr": lr, "batch_size": batch, "seed": seed, "steps": steps}))
        return trials

    def measure_tasks(self, trials: list[Trial]) -> list[dict[str, Any]]:
        return [{"name": trial.name, "config": self.trial_config(trial).to_dict(),
                 "out": str(self.trial_config(trial).run_dir / MEASUREMENTS_FILE)} for trial in trials]

    @staticmethod
    def measure(task: dict[str, Any], section: TemperatureSection, context: Any) -> dict[str, Any]:
        _, oracles = measured_solution(task["config"], section, context)
        return measure_solution(oracles["train"], oracles["eval"], section, context.seed)

    def write_report(self, trials: list[Trial]) -> StudyReport:
        import pandas as pd

        entries = []
        for trial in trials:
            run_dir = self.trial_config(trial).run_dir
            measured = json.loads((run_dir / MEASUREMENTS_FILE).read_text())
            scalars = {k: v for k, v in measured.items() if not k.startswith("landscape")}
            entry = {"trial": trial.name, **trial.tags, "temperature": trial.tags["lr"] / trial.tags["batch_size"],
                     **scalars}
            if self.section.protocol == "equal_loss":
                entry.update(self.section.reached(run_dir, trial.tags["steps"]))
            entries.append(entry)
        frame = pd.DataFrame(entries)
        # Under equal_loss, a cell that never reached the target is not at the same training loss: left out.
        fitted = frame[frame.reached_target] if "reached_target" in frame else frame
        fits = {key: temperature_exponent(fitted.lr, fitted.batch_size, fitted[key], log)
                for key, log in fitted_measures(fitted, self.section)}
        figures = {"temperature_heatmaps": plots.temperature_heatmaps(frame, fits, self.study_dir)}
        markdown = temperature_markdown(frame, fits, figures, self.section)
        summary = {"exponents": {key: fit["exponent"] for key, fit in fits.items()}}
        return StudyReport(results={"entries": entries, "fits": fits}, markdown=markdown, plots=figures, table=frame,
                           summary=summary)


def fitted_measures(frame: Any, section: TemperatureSection) -> list[tuple[str, bool]]:
    """(column, fit its logarithm): test accuracy as it is, the curvature measures on a log scale."""
    eps = eps_name(section.epsilons[0])
    candidates = [("test_accuracy", False), ("hessian_top_eigenvalue", True), (f"adaptive_sharpness_eps{eps}", True),
                  (f"sharpness_eps{eps}", True), ("hessian_trace", True)]
    return [(key, log) for key, log in candidates if key in frame and (not log or (frame[key] > 0).all())]


def temperature_exponent(lr: Any, batch: Any, values: Any, log: bool = False) -> dict[str, Any]:
    """The k for which `values` is best a function of u = log lr - k log B: for each candidate k, a
    quadratic in u is fitted by least squares, and k minimizes its residual sum of squares (RSS).
    The 95% interval holds the k whose profile likelihood ratio, n log(RSS(k) / RSS_min), stays below
    chi-squared's 3.84 (1 degree of freedom, Gaussian residuals). R^2 is the best fit's."""
    lr, batch = np.log(np.asarray(lr, float)), np.log(np.asarray(batch, float))
    y = np.log(np.asarray(values, float)) if log else np.asarray(values, float)
    total = float(((y - y.mean()) ** 2).sum())
    rss = np.array([_quadratic_rss(lr - k * batch, y) for k in EXPONENTS])
    best = int(rss.argmin())
    floor = max(rss[best], 1e-12 * max(total, 1e-300))
    inside = EXPONENTS[len(y) * np.log(np.maximum(rss, floor) / floor) <= CHI2_95]
    low, high = float(inside.min()), float(inside.max())
    return {"exponent": float(EXPONENTS[best]), "interval": [low, high], "r2": 1 - float(rss[best]) / total if total else 1.0,
            "log": log, "follows_lr_over_b": bool(low <= 1.0 <= high), "points": len(y)}


def _quadratic_rss(u: np.ndarray, y: np.ndarray) -> float:
    design = np.stack([np.ones_like(u), u, u * u], axis=1)
    _, residual, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < 3 or residual.size == 0:  # fewer distinct u than parameters: compute the residual directly
        coefficients = np.linalg.lstsq(design, y, rcond=None)[0]
        return float(((design @ coefficients - y) ** 2).sum())
    return float(residual[0])


def temperature_markdown(frame: Any, fits: dict[str, dict[str, Any]], figures: dict[str, Path],
                         section: TemperatureSection) -> str:
    rows = [{"measure": key, "k": fit["exponent"], "95% interval": f"[{fit['interval'][0]:.2f}, {fit['interval'][1]:.2f}]",
             "R^2": fit["r2"], "scale": "log" if fit["log"] else "linear",
             "follows lr/B (k = 1 inside)": "yes" if fit["follows_lr_over_b"] else "no"} for key, fit in fits.items()]
    import pandas as pd

    shown = ["lr", "batch_size", "seed", "steps", "reached_target", "temperature", "train_loss", "test_accuracy",
             *[c for c in frame.columns if "sharpness" in c], "hessian_top_eigenvalue", "hessian_trace", "noise_scale"]
    lines = [
        f"# Temperature study `{section.name}`",
        "",
        (f"Every cell of the grid trains until its training loss reaches {section.target_loss:g} (within "
         f"{section.max_steps} steps; cells that never reach it are left out of the fits)"
         if section.protocol == "equal_loss" else "Every cell of the grid trains for the same epochs")
        + " at its own learning rate lr and batch size B (no scaling rule). If SGD's temperature lr/B sets the "
        "solution (Jastrzebski et al. 2017; Smith & Le 2018), "
        "each measure depends on lr/B alone, and its contours follow the dashed lines of constant lr/B. For each "
        "measure, k is the exponent for which the measure is best a function of lr / B^k (a quadratic in "
        "log lr - k log B, least squares; the interval from the profile likelihood, 95%). Smith & Le predict k = 1; "
        "k = 0 means the batch size does not matter at a fixed lr, k = 0.5 the square-root rule.",
        "",
        "## Exponents",
        "",
        pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"),
        "",
        "## Every cell",
        "",
        frame[[c for c in shown if c in frame]].to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    lines += markdown_sections(figures)
    return "\n".join(lines)
