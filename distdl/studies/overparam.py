"""`distdl study overparam`: a width sweep (Du et al. 2018; Nakkiran et al. 2019).

Trains the study file's model at each width (`model.width` of `two_layer_relu`, or the
`model.width_multiplier` of a CIFAR ResNet) and measures, per width: the training-loss curve and
the linear convergence rate fitted to it (Du et al.: the loss of a wide enough two-layer ReLU
network falls geometrically under gradient descent), the relative distance from initialization
||W - W0|| / ||W0|| (it shrinks as the width grows: wide networks barely move), the fraction of ReLU
activation patterns that changed during training, and the train and test error. The exponent of
distance against width is fitted on log-log axes (Du et al.'s analysis gives about -1/2). With
`data.label_noise` in the training config, the test error against width shows the double-descent
peak of Nakkiran et al. near the width where the network starts to fit every training label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import numpy as np
import torch
from annotated_types import Interval

from distdl.collectives import all_reduce_sum
from distdl.config import AtLeastOne
from distdl.figures import markdown_sections
from distdl.registry import STUDIES
from distdl.studies import plots
from distdl.studies.base import (
    MEASUREMENTS_FILE,
    Study,
    StudyReport,
    StudySection,
    Trial,
    check_seeds,
    check_sweep,
    trained_workload,
)
from distdl.studies.measures import LossOracle

WidthKey = Literal["model.width", "model.width_multiplier"]
WIDTH_KEYS = get_args(WidthKey)


@dataclass
class OverparamSection(StudySection):
    name: str = "overparam"
    widths: list[int] = field(default_factory=lambda: [32, 128, 512, 2048, 8192])
    seeds: list[int] = field(default_factory=lambda: [0])
    # model.width (two_layer_relu's hidden units) or model.width_multiplier (cifar_resnet*).
    width_key: WidthKey = "model.width"
    # The convergence-rate fit leaves out this leading fraction of the loss curve.
    fit_skip: Annotated[float, Interval(ge=0, lt=1)] = 0.1
    measure_batch_size: AtLeastOne = 500


@STUDIES.register("overparam")
class OverparamStudy(Study):
    section_class = OverparamSection

    @classmethod
    def validate(cls, section: OverparamSection) -> None:
        check_sweep("study.widths", section.widths, "widths")
        check_seeds(section.seeds)

    def trials(self, train_examples: int) -> list[Trial]:
        return [Trial(f"width{width}-seed{seed}", {self.section.width_key: width, "run.seed": seed},
                      {"width": width, "seed": seed})
                for width in sorted(self.section.widths) for seed in self.section.seeds]

    def measure_tasks(self, trials: list[Trial]) -> list[dict[str, Any]]:
        return [{"name": trial.name, "config": self.trial_config(trial).to_dict(),
                 "out": str(self.trial_config(trial).run_dir / MEASUREMENTS_FILE)} for trial in trials]

    @staticmethod
    def measure(task: dict[str, Any], section: OverparamSection, context: Any) -> dict[str, Any]:
        from distdl.workloads.base import initial_models

        workload, model = trained_workload(task["config"], context)
        initial = initial_models(workload, context.seed)["model"].to(context.device).eval()
        out = {"relative_distance": relative_distance(model, initial)}
        train = workload.measurement_batches("train", None, section.measure_batch_size)
        for split, batches in (("train", train), ("test", workload.measurement_batches("eval", None,
                                                                                         section.measure_batch_size))):
            result = LossOracle(model, batches, workload.loss_sum, context.device).evaluate()
            out[f"{split}_loss"], out[f"{split}_error"] = result.loss, 1 - result.accuracy
        out["activation_change"] = activation_change(model, initial, train)
        return out

    def write_report(self, trials: list[Trial]) -> StudyReport:
        import pandas as pd

        entries, curves = [], {}
        for trial in trials:
            run_dir = self.trial_config(trial).run_dir
            measured = json.loads((run_dir / MEASUREMENTS_FILE).read_text())
            steps, losses = loss_curve(run_dir)
            curves[trial.tags["width"], trial.tags["seed"]] = (steps, losses)
            rate, r2 = linear_rate(steps, losses, self.section.fit_skip)
            entries.append({"trial": trial.name, **trial.tags, **measured, "final_train_loss_logged": losses[-1],
                            "convergence_rate": rate, "convergence_fit_r2": r2})
        frame = pd.DataFrame(entries)
        exponent, intercept = distance_exponent(frame)
        figures = {
            "loss_curves": plots.loss_curves(curves, self.study_dir),
            "distance_vs_width": plots.distance_against_width(frame, exponent, intercept, self.study_dir),
            "error_vs_width": plots.error_against_width(frame, self.study_dir),
        }
        markdown = overparam_markdown(frame, exponent, figures, self.section, self.base)
        return StudyReport(results={"distance_exponent": exponent, "entries": entries}, markdown=markdown,
                           plots=figures, table=frame, summary={"distance_exponent": exponent})


@torch.no_grad()
def relative_distance(model: torch.nn.Module, initial: torch.nn.Module) -> float:
    """||W - W0|| / ||W0|| over the trained parameters."""
    pairs = [(p, q) for p, q in zip(model.parameters(), initial.parameters()) if q.requires_grad]
    moved = sum(float((p.double() - q.double()).pow(2).sum()) for p, q in pairs)
    start = sum(float(q.double().pow(2).sum()) for _, q in pairs)
    return float(np.sqrt(moved / start))


def activation_change(model: torch.nn.Module, initial: torch.nn.Module,
                      batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Optional[float]:
    """The fraction of (example, ReLU unit) pairs whose on/off state differs between the initial and
    the trained network, over every rank's examples; None for models without nn.ReLU modules."""
    relus = [[m for m in net.modules() if isinstance(m, torch.nn.ReLU)] for net in (model, initial)]
    if not relus[0]:
        return None
    counts = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device if batches else "cpu")
    with torch.no_grad():
        for images, _ in batches:
            patterns = []
            for net, modules in zip((model, initial), relus):
                seen: list[torch.Tensor] = []
                hooks = [m.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out > 0))
                         for m in modules]
                net(images)
                for hook in hooks:
                    hook.remove()
                patterns.append(seen)
            for now, then in zip(*patterns):
                counts[0] += (now != then).sum()
                counts[1] += now.numel()
    changed, total = all_reduce_sum(counts).tolist()
    return changed / total if total else None


def loss_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from distdl.rundir import read_metrics

    points = [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]
    steps, losses = np.array(points, dtype=float).T
    return steps, losses


def linear_rate(steps: np.ndarray, losses: np.ndarray, skip: float) -> tuple[float, float]:
    """The per-step decay rate r of loss ~ exp(-r step) fitted past the first `skip` of the curve
    (Du et al.: (1 - eta lambda_0 / 2)^k), and the fit's R^2."""
    from scipy.stats import linregress

    keep = steps >= steps.max() * skip
    if keep.sum() < 3 or (losses[keep] <= 0).any():
        return float("nan"), float("nan")
    fit = linregress(steps[keep], np.log(losses[keep]))
    return float(-fit.slope), float(fit.rvalue**2)


def distance_exponent(frame: Any) -> tuple[float, float]:
    """The slope and intercept of log(relative distance) against log(width), over all seeds."""
    from scipy.stats import linregress

    if frame["width"].nunique() < 2:
        return float("nan"), float("nan")
    fit = linregress(np.log(frame["width"]), np.log(frame["relative_distance"]))
    return float(fit.slope), float(fit.intercept)


def overparam_markdown(frame: Any, exponent: float, figures: dict[str, Path], section: OverparamSection,
                       base: dict[str, Any]) -> str:
    noise = base.get("data", {}).get("label_noise", 0.0)
    shown = ["width", "seed", "relative_distance", "activation_change", "convergence_rate", "convergence_fit_r2",
             "train_loss", "train_error", "test_error"]
    lines = [
        f"# Over-parametrization study `{section.name}`",
        "",
        f"Width sweep over `{section.width_key}` = {sorted(section.widths)}"
        + (f", with {noise:.0%} of the training labels replaced at random" if noise else "") + ".",
        "",
        f"**Distance from initialization against width: exponent {exponent:.3f}** (the slope on log-log axes; "
        "Du et al. 2018's analysis of two-layer ReLU networks in the 1/sqrt(m) parametrization gives about "
        "-0.5: ||W - W0|| stays bounded while ||W0|| grows as sqrt(m)).",
        "",
        "The convergence rate r is fitted as loss ~ exp(-r step) past the first "
        f"{section.fit_skip:.0%} of training; Du et al. bound the loss by (1 - eta lambda_0 / 2)^step for "
        "widths large enough, so r settles to one value as the width grows.",
        "",
        frame[[c for c in shown if c in frame]].to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    lines += markdown_sections(figures)
    return "\n".join(lines)
