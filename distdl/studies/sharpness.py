"""`distdl study sharpness`: large- against small-batch training (Keskar et al. 2017).

Trains the study file's model at each batch size and seed, under any of three protocols:
- equal_epochs (Keskar et al.): every batch size trains the config's `trainer.epochs`, so the
  large batch takes far fewer optimizer steps;
- equal_steps (Hoffer et al. 2017): every batch size trains as many steps as the smallest batch
  does in those epochs, which separates sharp minima from under-training;
- equal_loss: every batch size (and every variant arm) trains until its training loss reaches
  `study.target_loss`, so the solutions are compared at the same fit to the training set.
On each solution it measures, data-parallel: train and test loss and accuracy, Keskar's
epsilon-sharpness (full space and a random subspace), the adaptive (scale-invariant) sharpness,
the top Hessian eigenvalue and the Hessian trace; along the line between the smallest- and the
largest-batch solution, the loss and accuracy (Keskar's Figure 3). Training logs the gradient noise
scale (McCandlish et al. 2018).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from annotated_types import Gt, MinLen

from distdl.config import AtLeastOne, Finite, config_from_dict, noise_scale_possible
from distdl.errors import ConfigError
from distdl.figures import markdown_sections
from distdl.noise_scale import late_noise_terms, noise_scale_of_run
from distdl.optim import effective_lr
from distdl.registry import STUDIES
from distdl.rundir import read_summary
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
    trained_workload,
)
from distdl.studies.measures import (
    interpolation,
)
from distdl.studies.plots import eps_name
from distdl.studies.solutions import MeasurementSection, measure_solution, measured_solution

Protocol = Literal["equal_epochs", "equal_steps", "equal_loss"]
# What the large batch may add to close its gap to the small one (study.variants).
Variant = Literal["isotropic_noise", "minibatch_noise", "sam"]
PLAIN = "none"


@dataclass
class SharpnessSection(MeasurementSection, LossTarget):
    name: str = "sharpness"
    batch_sizes: list[int] = field(default_factory=lambda: [32, 400])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # equal_loss trains each trial until its training loss reaches target_loss, within max_steps.
    protocols: Annotated[list[Protocol], MinLen(1)] = field(default_factory=lambda: ["equal_epochs", "equal_steps"])
    # Points on the line from the small- to the large-batch solution, alpha in [-1, 2] as Keskar's Figure 3.
    interpolation_points: AtLeastOne = 25
    # More arms at the largest batch, each measured as the others and compared with the smallest batch:
    # isotropic_noise (Langevin noise at noise_temperature), minibatch_noise (the gradient noise of the
    # smallest batch), sam (SAM with sam_rho; ASAM with sam_adaptive).
    variants: list[Variant] = field(default_factory=list)
    # A temperature, or `matched`: the one whose noise is as large as the small batch's extra gradient
    # noise at the large batch (matched_temperature), from the small batch's trained runs.
    noise_temperature: Optional[Union[Annotated[float, Gt(0), Finite], Literal["matched"]]] = None
    sam_rho: Annotated[float, Gt(0), Finite] = 0.05
    sam_adaptive: bool = False


@STUDIES.register("sharpness")
class SharpnessStudy(Study):
    section_class = SharpnessSection

    @classmethod
    def validate(cls, section: SharpnessSection) -> None:
        check_sweep("study.batch_sizes", section.batch_sizes, "batch sizes")
        check_seeds(section.seeds)
        if len(set(section.variants)) != len(section.variants):
            raise ConfigError(f"study.variants={section.variants} lists a variant twice")
        if section.variants and len(section.batch_sizes) < 2:
            raise ConfigError("study.variants add arms at the largest batch to compare with the smallest: "
                              f"study.batch_sizes={section.batch_sizes} needs two batch sizes or more")
        if "isotropic_noise" in section.variants and section.noise_temperature is None:
            raise ConfigError("study.variants has isotropic_noise: set study.noise_temperature (the Langevin "
                              "temperature T; each step adds N(0, 2 lr T) to every weight), or `matched`")
        if "equal_loss" in section.protocols and section.target_loss is None:
            raise ConfigError("study.protocols has equal_loss, which trains every trial to the same training loss: "
                              "set study.target_loss")

    # -- trials
    def trials(self, train_examples: int) -> list[Trial]:
        base = config_from_dict(self.base)
        workers = base.scaling.num_workers
        if base.trainer.epochs is None and set(self.section.protocols) - {"equal_loss"}:
            raise ConfigError("the sharpness study compares batch sizes at equal epochs: set trainer.epochs "
                              "(and not trainer.max_steps) in the training config, or study.protocols=[equal_loss]")
        noise = noise_scale_possible(base)
        trials: dict[str, Trial] = {}
        for protocol in self.section.protocols:
            for batch in sorted(self.section.batch_sizes):
                steps, suffix, budget = self._budget(protocol, batch, workers, train_examples)
                for seed in self.section.seeds:
                    name = f"batch{batch}-seed{seed}-{suffix}"
                    trial = trials.setdefault(name, Trial(name, {
                        **batch_overrides(batch, workers), **budget, "run.seed": seed, "trainer.noise_scale": noise,
                    }, {"batch_size": batch, "seed": seed, "steps": steps, "protocols": []}))
                    trial.tags["protocols"].append(protocol)
        variants = [v for v in self.section.variants if not self._needs_trained(v)]
        return list(trials.values()) + self._arms(list(trials.values()), variants)

    def _budget(self, protocol: str, batch: int, workers: int, train_examples: int) -> tuple[int, str, dict[str, Any]]:
        """A trial's step budget, the suffix of its name, and its trainer keys under the protocol."""
        section = self.section
        if protocol == "equal_loss":
            return section.max_steps, f"loss{section.target_loss:g}", section.loss_budget()
        steps = epoch_steps(self.base, min(section.batch_sizes) if protocol == "equal_steps" else batch, workers,
                            train_examples)
        return steps, f"steps{steps}", {"trainer.max_steps": steps}

    def later_trials(self, trials: list[Trial]) -> list[Trial]:
        """The isotropic arms at the matched temperature, which needs the small batch's trained runs."""
        if not self._needs_trained("isotropic_noise") or "isotropic_noise" not in self.section.variants:
            return []
        temperatures = self.matched_temperatures(trials)
        missing = [protocol for protocol, value in temperatures.items() if value is None]
        if missing:
            raise ConfigError(f"study.noise_temperature=matched: the smallest batch's runs under {', '.join(missing)} "
                              "logged no gradient-noise terms (trainer.noise_scale needs 2 workers or gradient "
                              "accumulation); give study.noise_temperature a value")
        return self._arms(trials, ["isotropic_noise"], temperatures)

    def _needs_trained(self, variant: str) -> bool:
        return variant == "isotropic_noise" and self.section.noise_temperature == "matched"

    def _arms(self, trials: list[Trial], variants: list[str],
              temperatures: Optional[dict[str, float]] = None) -> list[Trial]:
        """Each variant's trial next to each largest-batch plain trial, with its protocols and budget."""
        arms = []
        for trial in trials:
            if trial.tags["batch_size"] != max(self.section.batch_sizes) or "variant" in trial.tags:
                continue
            for variant in variants:
                temperature = temperatures[trial.tags["protocols"][0]] if temperatures else None
                arms.append(Trial(trial.name.replace("-seed", f"-{variant}-seed", 1),
                                  {**trial.overrides, **self._variant_overrides(variant, temperature)},
                                  {**trial.tags, "variant": variant, "protocols": list(trial.tags["protocols"])}))
        return arms

    def _variant_overrides(self, variant: str, temperature: Optional[float] = None) -> dict[str, Any]:
        section = self.section
        if variant == "sam":
            return {"optimizer.sam": {"rho": section.sam_rho, "adaptive": section.sam_adaptive}}
        if variant == "isotropic_noise":
            return {"optimizer.noise": {"kind": "isotropic", "temperature": temperature or section.noise_temperature}}
        return {"optimizer.noise": {"kind": "minibatch", "batch_size": min(section.batch_sizes)}}

    def matched_temperatures(self, trials: list[Trial]) -> dict[str, Optional[float]]:
        """Per protocol, the Langevin temperature whose noise per step has the total variance of the small
        batch's extra gradient noise at the large batch: lr^2 tr(Sigma) (1/b - 1/B) = 2 lr T d, so
        T = lr tr(Sigma) (1/b - 1/B) / (2 d). tr(Sigma) is the mean over seeds of the small-batch runs'
        noise-scale terms late in training, lr the large batch's, d the trainable parameters. None where
        those runs logged no noise terms."""
        small, large = min(self.section.batch_sizes), max(self.section.batch_sizes)
        lr = effective_lr(config_from_dict(self.base).optimizer, large)
        temperatures: dict[str, Optional[float]] = {}
        for protocol in self.section.protocols:
            runs = [self.trial_config(t).run_dir for t in trials if t.tags["batch_size"] == small
                    and "variant" not in t.tags and protocol in t.tags["protocols"]]
            traces = [terms[0] for terms in map(late_noise_terms, runs) if terms]
            parameters = sum(read_summary(runs[0]).get("trainable_parameters", {}).values()) if runs else 0
            temperatures[protocol] = (lr * float(np.mean(traces)) * (1 / small - 1 / large) / (2 * parameters)
                                      if traces and parameters else None)
        return temperatures

    # -- measurements
    def measure_tasks(self, trials: list[Trial]) -> list[dict[str, Any]]:
        tasks = [{"name": trial.name, "kind": "solution", "config": self.trial_config(trial).to_dict(),
                  "out": str(self.trial_config(trial).run_dir / MEASUREMENTS_FILE)} for trial in trials]
        for protocol, seed, small, large in self._pairs(trials):
            tasks.append({"name": f"interpolation {protocol} seed {seed}", "kind": "interpolation",
                          "config": self.trial_config(small).to_dict(), "other": self.trial_config(large).to_dict(),
                          "out": str(self.study_dir / "interpolation" / f"{protocol}-seed{seed}.json")})
        return tasks

    def _pairs(self, trials: list[Trial]) -> list[tuple[str, int, Trial, Trial]]:
        """(protocol, seed, smallest-batch trial, largest-batch trial) for each protocol and seed."""
        pairs = []
        if len(self.section.batch_sizes) < 2:
            return pairs
        for protocol in self.section.protocols:
            for seed in self.section.seeds:
                mine = sorted((t for t in trials if protocol in t.tags["protocols"] and t.tags["seed"] == seed
                               and t.tags.get("variant", PLAIN) == PLAIN), key=lambda t: t.tags["batch_size"])
                pairs.append((protocol, seed, mine[0], mine[-1]))
        return pairs

    @staticmethod
    def measure(task: dict[str, Any], section: SharpnessSection, context: Any) -> dict[str, Any]:
        model, oracles = measured_solution(task["config"], section, context)
        if task["kind"] == "interpolation":
            _, other = trained_workload(task["other"], context)
            alphas = np.linspace(-1.0, 2.0, section.interpolation_points)
            start = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
            end = {k: v.double() if v.is_floating_point() else v for k, v in other.state_dict().items()}
            return {"alphas": alphas.tolist(), "rows": interpolation(model, {"train": oracles["train"],
                                                                             "test": oracles["eval"]},
                                                                     start, end, alphas)}
        return measure_solution(oracles["train"], oracles["eval"], section, context.seed)

    # -- report
    def write_report(self, trials: list[Trial]) -> StudyReport:
        import pandas as pd

        results: list[dict[str, Any]] = []
        surfaces: dict[str, dict[str, Any]] = {}
        for trial in trials:
            config = self.trial_config(trial)
            measured = json.loads((config.run_dir / MEASUREMENTS_FILE).read_text())
            for key in ("landscape_1d", "landscape_2d"):
                if key in measured:
                    surfaces.setdefault(key, {})[trial.name] = measured.pop(key)
            noise = noise_scale_of_run(config.run_dir)
            for protocol in trial.tags["protocols"]:
                budget = self.section.reached(config.run_dir, trial.tags["steps"]) if protocol == "equal_loss" else \
                    {"steps": trial.tags["steps"]}
                results.append({"trial": trial.name, "protocol": protocol, "batch_size": trial.tags["batch_size"],
                                "variant": trial.tags.get("variant", PLAIN), "seed": trial.tags["seed"],
                                **budget, **measured, "noise_scale": noise})
        frame = pd.DataFrame(results)
        ratios = sharpness_ratios(frame, self.section)
        gaps = variant_gaps(frame, self.section) if self.section.variants else None
        curves = {f"{protocol} seed {seed}": json.loads(
                      (self.study_dir / "interpolation" / f"{protocol}-seed{seed}.json").read_text())
                  for protocol, seed, _, _ in self._pairs(trials)}
        figures = {
            "sharpness_vs_batch_size": plots.sharpness_against_batch(frame[frame.variant == PLAIN], self.section,
                                                                     self.study_dir),
            "variants": plots.variant_gaps(gaps, self.study_dir) if gaps is not None else None,
            "interpolation": plots.interpolation_curves(curves, self.study_dir) if curves else None,
            "noise_scale": plots.noise_scale_curves(
                {t.name: self.trial_config(t).run_dir for t in trials}, self.study_dir),
            "landscape_1d": plots.landscape_lines(surfaces["landscape_1d"], self.study_dir)
            if "landscape_1d" in surfaces else None,
            "landscape_2d": plots.landscape_contours(surfaces["landscape_2d"], self.study_dir)
            if "landscape_2d" in surfaces else None,
        }
        figures = {k: v for k, v in figures.items() if v is not None}
        temperature = self.matched_temperatures(trials)
        markdown = sharpness_markdown(frame, ratios, figures, self.section, gaps, temperature)
        summary = {"ratios": {f"{r['protocol']}/seed{r['seed']}": r for r in ratios.to_dict(orient="records")},
                   "matched_temperature": temperature}
        if gaps is not None:
            summary["variants"] = gaps.to_dict(orient="records")
        return StudyReport(results={"entries": results, **summary}, markdown=markdown, plots=figures, table=frame,
                           summary=summary)


RATIO_KEYS = ("sharpness_eps{}", "subspace_sharpness_eps{}", "adaptive_sharpness_eps{}")


def _ratio_keys(frame: Any, section: SharpnessSection) -> list[str]:
    keys = [k.format(eps_name(e)) for e in section.epsilons for k in RATIO_KEYS] + [
        "hessian_top_eigenvalue", "hessian_trace"]
    return [k for k in keys if k in frame]


def sharpness_ratios(frame: Any, section: SharpnessSection) -> Any:
    """Largest over smallest batch (the plain arms), per protocol and seed: each curvature measure's
    ratio, and the test-accuracy and train-loss differences."""
    import pandas as pd

    if len(section.batch_sizes) < 2:
        return pd.DataFrame()
    keys = _ratio_keys(frame, section)
    small, large = min(section.batch_sizes), max(section.batch_sizes)
    rows = []
    for (protocol, seed), group in frame[frame.variant == PLAIN].groupby(["protocol", "seed"]):
        a = group[group.batch_size == small].iloc[0]
        b = group[group.batch_size == large].iloc[0]
        row = {"protocol": protocol, "seed": seed, "small_batch": small, "large_batch": large}
        row.update({f"{k}_ratio": b[k] / a[k] if a[k] else float("nan") for k in keys})
        row["test_accuracy_difference"] = b["test_accuracy"] - a["test_accuracy"]
        row["train_loss_large"], row["train_loss_small"] = b["train_loss"], a["train_loss"]
        rows.append(row)
    return pd.DataFrame(rows)


def variant_gaps(frame: Any, section: SharpnessSection) -> Any:
    """Each large-batch arm (plain, and each of study.variants) against the small batch, per protocol
    and seed: the test-accuracy gap (arm minus small batch: 0 means the gap is closed) and each
    curvature measure's ratio (1: as flat as the small batch)."""
    import pandas as pd

    keys = _ratio_keys(frame, section)
    small, large = min(section.batch_sizes), max(section.batch_sizes)
    rows = []
    for (protocol, seed), group in frame.groupby(["protocol", "seed"]):
        reference = group[(group.batch_size == small) & (group.variant == PLAIN)].iloc[0]
        for _, arm in group[group.batch_size == large].iterrows():
            row = {"protocol": protocol, "seed": seed, "arm": arm_name(arm.variant, large),
                   "test_accuracy_gap": arm.test_accuracy - reference.test_accuracy,
                   "train_loss": arm.train_loss}
            row.update({f"{k}_ratio": arm[k] / reference[k] if reference[k] else float("nan") for k in keys})
            rows.append(row)
    return pd.DataFrame(rows)


def arm_name(variant: str, batch: int) -> str:
    return f"batch {batch}" if variant == PLAIN else f"batch {batch} + {variant.replace('_', ' ')}"


def sharpness_markdown(frame: Any, ratios: Any, figures: dict[str, Path], section: SharpnessSection,
                       gaps: Any = None, temperatures: Optional[dict[str, Optional[float]]] = None) -> str:
    shown = ["protocol", "batch_size", "variant", "seed", "steps", "reached_target", "train_loss", "train_accuracy", "test_accuracy",
             *[c for c in frame.columns if "sharpness" in c], "hessian_top_eigenvalue", "hessian_trace", "noise_scale"]
    lines = [
        f"# Sharpness study `{section.name}`",
        "",
        "Large- against small-batch solutions (Keskar et al. 2017). **equal_epochs** trains every batch size "
        "for the same epochs, as Keskar et al. did, so the large batch takes far fewer steps; **equal_steps** "
        "gives every batch size the smallest batch's step count (Hoffer et al. 2017). A large batch that is "
        "sharper only under equal_epochs, or whose training loss stays higher there, is under-trained rather "
        "than in a sharper minimum: compare the train losses next to the ratios. **equal_loss** trains every "
        "batch size and arm until its window-mean training loss reaches "
        f"{section.target_loss if section.target_loss is not None else '(unset)'} (within {section.max_steps} "
        "steps), so all are compared at the same fit to the training set.",
        "",
        *unreached_markdown(frame),
        "Sharpness is Keskar's Metric 2.1 (the largest rise of the training loss within the box "
        "|y_i| <= eps (|x_i| + 1), over 1 + f(x), times 100; L-BFGS-B, "
        f"{section.sharpness_iterations} iterations), in the full space and in a random "
        f"{section.subspace_dimension}-dimensional subspace. The raw values depend on the parameters' scale "
        "(the box's +1; batch norm makes the loss blind to some scales), so read them as ratios between batch "
        "sizes. The adaptive sharpness (box eps |x_i|, Kwon et al. 2021) does not change when a ReLU network "
        "is rescaled without changing its function, which Dinh et al. 2017 showed can make the raw sharpness "
        "anything.",
        "",
        "## Large over small batch",
        "",
        ratios.to_markdown(index=False, floatfmt=".4g") if len(ratios) else "(one batch size: no ratios)",
        "",
        *variant_markdown(gaps, section, temperatures or {}),
        "## Every solution",
        "",
        frame[[c for c in shown if c in frame]].to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    lines += markdown_sections(figures)
    return "\n".join(lines)


def unreached_markdown(frame: Any) -> list[str]:
    """A warning naming the equal_loss trials that ran out of steps before the target loss."""
    if "reached_target" not in frame:
        return []
    missed = frame[frame.reached_target.eq(False)].trial.tolist()
    return [f"**Not at the target loss** (study.max_steps ran out first, so they are not at the same fit as the "
            f"others): {', '.join(missed)}.", ""] if missed else []


def variant_markdown(gaps: Any, section: SharpnessSection, temperatures: dict[str, Optional[float]]) -> list[str]:
    """The arms' gaps to the small batch, per seed and as the mean and spread over seeds."""
    lines = []
    known = {protocol: value for protocol, value in temperatures.items() if value is not None}
    if known:
        values = ", ".join(f"{value:.3g} ({protocol})" for protocol, value in known.items())
        ran = "." if section.noise_temperature is None else "; the isotropic arms ran at it." \
            if section.noise_temperature == "matched" else f"; this study ran T = {section.noise_temperature:.3g}."
        lines += ["Isotropic noise as large as the small batch's extra gradient noise at the large batch has "
                  f"temperature T = lr tr(Sigma) (1/b - 1/B) / (2 d) = {values} (tr(Sigma) from the small-batch "
                  "runs' noise-scale terms in the second half of training, d the trainable parameters)" + ran, ""]
    if gaps is None:
        return lines
    columns = [c for c in gaps.columns if c not in ("seed", "protocol", "arm")]
    summary = gaps.groupby(["protocol", "arm"], sort=False)[columns].agg(["mean", "std"])
    summary.columns = [f"{column} {stat}" for column, stat in summary.columns]
    return lines + [
        "## Closing the gap: large-batch arms against the small batch",
        "",
        "Each arm trains the largest batch, plain or with one of study.variants, and is compared with the "
        "smallest batch of the same protocol and seed: `test_accuracy_gap` is the arm's test accuracy minus the "
        "small batch's (0: the gap is closed), each `_ratio` the arm's measure over the small batch's (1: as "
        "flat). Mean and standard deviation over seeds:",
        "",
        summary.reset_index().to_markdown(index=False, floatfmt=".4g"),
        "",
        "Per seed:",
        "",
        gaps.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
