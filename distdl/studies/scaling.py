"""`distdl study scaling`: what more workers and larger batches buy.

- Throughput against the number of workers: strong scaling (the global batch fixed, split over
  more workers) and weak scaling (each worker's batch fixed), with the efficiency of each:
  strong: speedup / workers; weak: per-worker throughput over the one-worker run's.
- Steps to a target training loss against the global batch size, the learning rate scaled linearly
  with the batch (Goyal et al. 2017; Shallue et al. 2018 measured this curve on many workloads). The
  critical batch size is read off the curve by fitting McCandlish et al.'s S = S_min (1 + B_crit / B),
  and set next to the gradient noise scale B_simple measured during the same runs, which predicts it.
- With `study.optimizers`, that sweep for each optimizer (say SGD against LARS), each scaling its
  learning rate by its own rule, and the curves and critical batches side by side: You et al.
  (2017, 2019) claim that layer-wise adaptation extends the range where doubling the batch halves
  the steps.

All figures come from the trials' own metrics (samples/s over windows that exclude evaluation and
checkpoints; the window-mean training loss); nothing is measured after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import numpy as np
from annotated_types import Gt, MinLen

from distdl.config import AtLeastOne, OptimizerSection, build_section, config_from_dict, noise_scale_possible
from distdl.errors import ConfigError
from distdl.figures import markdown_sections
from distdl.noise_scale import noise_scale_of_run
from distdl.registry import STUDIES
from distdl.rundir import read_metrics
from distdl.studies import plots
from distdl.studies.base import (
    Study,
    StudyReport,
    StudySection,
    Trial,
    batch_overrides,
    check_seeds,
    check_sweep,
    steps_to_target,
)


@dataclass
class ScalingSection(StudySection):
    name: str = "scaling"
    # Worker counts for the throughput runs (the Ray cluster must hold the largest).
    workers: list[int] = field(default_factory=lambda: [1, 2])
    # strong, weak, or both.
    throughput_kinds: Annotated[list[Literal["strong", "weak"]], MinLen(1)] = field(
        default_factory=lambda: ["strong", "weak"])
    throughput_steps: AtLeastOne = 40
    # Strong scaling: this global batch at every worker count. Weak: this batch per worker.
    strong_batch_size: AtLeastOne = 256
    weak_micro_batch_size: AtLeastOne = 128
    # Steps to target: global batch sizes, run on the training config's scaling.num_workers.
    batch_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    target_loss: Annotated[float, Gt(0)] = 0.3
    # The step budget of each steps-to-target run (each stops at the target; one that does not reach
    # it is reported as such).
    max_steps: AtLeastOne = 2000
    # optimizer.lr is the learning rate at this batch size; other sizes scale it linearly.
    reference_batch_size: AtLeastOne = 32
    seeds: list[int] = field(default_factory=lambda: [0])
    # Optimizers to run the steps-to-target sweep with, each over every batch size: names (sgd, lars,
    # adam, adamw, lamb) or mappings of optimizer keys ({name: lars, lr: 2.0}) over the training
    # config's optimizer section. Each scales its lr with the batch by its own rule (OWN_SCALING)
    # unless it sets lr_scaling. Empty: the training config's optimizer, as it is.
    optimizers: list[Any] = field(default_factory=list)


# The learning-rate scaling rule each optimizer runs with in the study unless its entry sets one:
# linear for the momentum methods (Goyal et al. 2017 for SGD; LARS keeps SGD's rule, its trust ratio
# doing the rest), the square root for the adaptive ones (Hoffer et al. 2017 and Malladi et al.
# 2022 for Adam; You et al. 2019 for LAMB).
OWN_SCALING = {"sgd": "linear", "lars": "linear", "adam": "sqrt", "adamw": "sqrt", "lamb": "sqrt"}


def optimizer_choices(section: ScalingSection) -> list[dict[str, Any]]:
    """study.optimizers as optimizer-section overrides, each with its lr scaling rule; errors name the entry."""
    choices = []
    for index, entry in enumerate(section.optimizers):
        key = f"study.optimizers[{index}]"
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{key}: give an optimizer name or a mapping with a name, such as "
                              f"{{name: lars, lr: 2.0}}; got {entry!r}")
        build_section(OptimizerSection, entry, key)  # unknown keys and bad values, named
        choices.append({"lr_scaling": OWN_SCALING[entry["name"]], **entry})
    names = [choice["name"] for choice in choices]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(f"study.optimizers lists {', '.join(repeated)} more than once; each optimizer is one "
                          "curve (compare settings of one optimizer in separate studies)")
    return choices


@STUDIES.register("scaling")
class ScalingStudy(Study):
    section_class = ScalingSection

    @classmethod
    def validate(cls, section: ScalingSection) -> None:
        check_sweep("study.workers", section.workers, "worker counts")
        check_sweep("study.batch_sizes", section.batch_sizes, "batch sizes")
        check_seeds(section.seeds)
        optimizer_choices(section)
        for workers in section.workers:
            if section.strong_batch_size % workers:
                raise ConfigError(f"study.strong_batch_size={section.strong_batch_size} does not split evenly over "
                                  f"{workers} workers (study.workers)")

    def trials(self, train_examples: int) -> list[Trial]:
        section = self.section
        base = config_from_dict(self.base)
        workers = base.scaling.num_workers
        noise = noise_scale_possible(base)
        common = {"trainer.gradient_accumulation_steps": None, "trainer.epochs": None, "trainer.stop_at_loss": None}
        trials = []
        for kind in section.throughput_kinds:
            for count in sorted(section.workers):
                micro = section.strong_batch_size // count if kind == "strong" else section.weak_micro_batch_size
                trials.append(Trial(f"throughput-{kind}-workers{count}", {
                    **common, "scaling.num_workers": count, "trainer.micro_batch_size": micro,
                    "trainer.global_batch_size": micro * count, "trainer.max_steps": section.throughput_steps,
                    "trainer.log_every": max(1, section.throughput_steps // 8), "trainer.noise_scale": False,
                }, {"kind": kind, "workers": count, "global_batch_size": micro * count}))
        # One curve per optimizer; without study.optimizers the trials keep their names of old.
        for choice in optimizer_choices(section) or [{}]:
            prefix = f"target-{choice['name']}-" if choice else "target-"
            chosen = {f"optimizer.{key}": value for key, value in choice.items()}
            for batch in sorted(section.batch_sizes):
                for seed in section.seeds:
                    trials.append(Trial(f"{prefix}batch{batch}-seed{seed}", {
                        **common, **batch_overrides(batch, workers), "trainer.max_steps": section.max_steps,
                        "optimizer.reference_batch_size": section.reference_batch_size,
                        "trainer.noise_scale": noise, "trainer.stop_at_loss": section.target_loss, "run.seed": seed,
                        **chosen,
                    }, {"kind": "target", "optimizer": choice.get("name", base.optimizer.name), "batch_size": batch,
                        "seed": seed}))
        return trials

    def measure_tasks(self, trials: list[Trial]) -> list[dict[str, Any]]:
        return []  # everything comes from the trials' metrics

    @staticmethod
    def measure(task: dict[str, Any], section: Any, context: Any) -> dict[str, Any]:
        raise NotImplementedError("the scaling study measures nothing after training")

    def write_report(self, trials: list[Trial]) -> StudyReport:
        import pandas as pd

        throughput, targets = [], []
        for trial in trials:
            run_dir = self.trial_config(trial).run_dir
            if trial.tags["kind"] == "target":
                targets.append({**trial.tags, "steps_to_target": steps_to_target(run_dir, self.section.target_loss),
                                "noise_scale": noise_scale_of_run(run_dir)})
            else:
                throughput.append({**trial.tags, "samples_per_s": samples_per_second(run_dir)})
        speed = add_efficiency(pd.DataFrame(throughput))
        curve = pd.DataFrame(targets)
        base = config_from_dict(self.base).optimizer
        rules = {c["name"]: c["lr_scaling"] for c in optimizer_choices(self.section)} or {base.name: base.lr_scaling}
        fits = {name: {"lr_scaling": rules[name], **critical_batch_size(group),
                       "noise_scale_batch": median_noise_scale(group)}
                for name, group in curve.groupby("optimizer", sort=False)}
        figures = {"throughput": plots.throughput_against_workers(speed, self.study_dir),
                   "steps_to_target": plots.steps_against_batch(curve, fits, self.section.target_loss,
                                                                self.study_dir)}
        # One optimizer: its fit at the top level, as before study.optimizers; several: by name.
        summary: dict[str, Any] = dict(next(iter(fits.values()))) if len(fits) == 1 else {"by_optimizer": fits}
        summary["efficiency"] = {f"{r['kind']}/workers{r['workers']}": r["efficiency"] for r in speed.to_dict("records")}
        results = {"entries": curve.to_dict("records"), "throughput": speed.to_dict("records"), "by_optimizer": fits,
                   **summary}
        markdown = scaling_markdown(speed, curve, fits, figures, self.section)
        return StudyReport(results=results, markdown=markdown, plots=figures, table=curve, summary=summary)


def median_noise_scale(curve: Any) -> Optional[float]:
    """B_simple over an optimizer's runs (the median: the early windows' estimates are noisy)."""
    noise = curve["noise_scale"].dropna()
    return float(noise.median()) if len(noise) else None


def samples_per_second(run_dir: Path) -> float:
    """The mean throughput over the logged windows after the first (which holds the warm-up)."""
    windows = [m["samples_per_s"] for m in read_metrics(run_dir) if "samples_per_s" in m]
    kept = windows[1:] or windows
    return float(np.mean(kept)) if kept else float("nan")


def add_efficiency(frame: Any) -> Any:
    """Strong: (throughput(n) / throughput(1)) / n. Weak: per-worker throughput over one worker's."""
    frame = frame.sort_values(["kind", "workers"]).reset_index(drop=True)
    efficiency = []
    for _, row in frame.iterrows():
        same = frame[frame.kind == row.kind]
        one = same[same.workers == same.workers.min()].iloc[0]
        per_worker = row.samples_per_s / row.workers
        efficiency.append(per_worker / (one.samples_per_s / one.workers))
    frame["samples_per_s_per_worker"] = frame.samples_per_s / frame.workers
    frame["efficiency"] = efficiency
    return frame


def critical_batch_size(curve: Any) -> dict[str, Any]:
    """S = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11) fitted over the batch sizes that
    reached the target, by least squares on log S: the steps span decades, and a fit on S itself is
    decided by the smallest batches alone.

    Bounded, and started from a grid of critical batches: started from a line fit, an unbounded
    fit of a real SGD curve (steps falling faster than 1/B at its small end, flat at its large end)
    walked off to S_min = 1e-129, B_crit = 1e133, where the least-squares minimum lay at S_min = 16.5,
    B_crit = 718. B_crit may lie up to 100x beyond the batches measured; a fit that ends on that
    bound means the curve shows no critical batch, and says so (`beyond_measured_batches`)."""
    from scipy.optimize import least_squares

    reached = curve.dropna(subset=["steps_to_target"]).groupby("batch_size").steps_to_target.mean()
    if len(reached) < 2:
        return {}
    batches, log_steps = reached.index.to_numpy(dtype=float), np.log(reached.to_numpy(dtype=float))
    # S >= S_min at every batch, so S_min lies below the fewest steps seen.
    lower = [log_steps.min() - np.log(1e4), np.log(batches.min() / 100)]
    upper = [log_steps.min(), np.log(batches.max() * 100)]

    def residuals(params: np.ndarray) -> np.ndarray:
        log_min, log_crit = params
        return log_min + np.log1p(np.exp(log_crit) / batches) - log_steps

    starts = [(log_steps.min() - np.log(2), np.log(batch)) for batch in batches]
    fit = min((least_squares(residuals, start, bounds=(lower, upper)) for start in starts), key=lambda r: r.cost)
    log_min, log_crit = fit.x
    spread = log_steps - log_steps.mean()
    return {"min_steps": float(np.exp(log_min)), "critical_batch_size": float(np.exp(log_crit)),
            "fit_r2_log": float(1 - (fit.fun**2).sum() / max((spread**2).sum(), 1e-300)),
            "beyond_measured_batches": bool(np.isclose(log_crit, upper[1]))}


def describe_fit(fit: dict[str, Any], number: Any) -> str:
    if fit.get("beyond_measured_batches"):
        return "beyond the batches measured (the steps still fall as 1/B)"
    return number(fit.get("critical_batch_size"))


def scaling_markdown(speed: Any, curve: Any, fits: dict[str, dict[str, Any]], figures: dict[str, Path],
                     section: ScalingSection) -> str:
    import pandas as pd

    def number(value: Any) -> str:
        return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.4g}"

    fitted = pd.DataFrame([{"optimizer": name, **fit} for name, fit in fits.items()])
    lines = [
        f"# Scaling study `{section.name}`",
        "",
        "## Throughput",
        "",
        f"Strong scaling keeps the global batch at {section.strong_batch_size}; weak scaling gives each worker "
        f"{section.weak_micro_batch_size}. Efficiency: strong, the speedup over the fewest workers divided by the "
        "worker ratio; weak, the throughput per worker over the fewest workers' (1 is perfect).",
        "",
        speed.to_markdown(index=False, floatfmt=".4g"),
        "",
        "## Steps to a target loss",
        "",
        f"Steps until the window-mean training loss first reaches {section.target_loss}, the learning rate "
        f"scaled from its value at batch {section.reference_batch_size} by each optimizer's rule (linear: Goyal "
        "et al. 2017; sqrt: the square root of the batch ratio). The critical batch size B_crit comes from a fit "
        "of S = S_min (1 + B_crit / B) on log S; the gradient noise scale B_simple, measured in the same runs, "
        "predicts it (McCandlish et al. 2018). Below B_crit, doubling the batch nearly halves the steps; above "
        "it, it buys little.",
        "",
        fitted.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    if len(fits) > 1:
        ranked = sorted(fits.items(), key=lambda item: -np.nan_to_num(item[1].get("critical_batch_size", np.nan),
                                                                       nan=-np.inf))
        lines += ["You et al. (2017, 2019) claim that layer-wise adaptation extends the range where doubling the "
                  "batch halves the steps. Here B_crit is " + ", ".join(
                      f"{describe_fit(fit, number)} for {name}" for name, fit in ranked) + ".", ""]
    lines += [curve.to_markdown(index=False, floatfmt=".4g"), ""]
    for name, group in curve.groupby("optimizer", sort=False):
        if missed := group[group.steps_to_target.isna()].batch_size.tolist():
            lines += [f"With {name}, batch sizes {missed} did not reach the target within {section.max_steps} "
                      "steps (study.max_steps).", ""]
    lines += markdown_sections(figures, " plot")
    return "\n".join(lines)
