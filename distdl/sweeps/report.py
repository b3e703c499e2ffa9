"""A sweep's results from its trials' run directories: one row per trial with its values, its best
metric and the step it came at, how far it trained and how it ended; the best trial; the steps the
scheduler saved; a plot of the metric against each searched key. Under PBT, a trial is one run per
stretch between the checkpoints it continued from: one row each, with where it came from."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distdl.engine.checkpoints import latest_checkpoint
from distdl.errors import ConfigError
from distdl.figures import figure_row, markdown_sections, save_figure
from distdl.rundir import read_metrics, read_summary, run_outcome, saved_config
from distdl.sweeps.section import Dimension, SweepSection

# Tune names a trial's directory <trainable>_<trial id>_<tag>_<date>. The basic search's trial ids are
# <experiment id>_<5-digit index>, a searcher's (Optuna's) 8 random hex digits; the index, or the
# whole id, names the trial's run (sweeps.section.trial_name).
TUNE_TRIAL_ID = re.compile(r"^sweep_trial_((?:[0-9a-f]{5}_)?([0-9a-f]{5,8}))_")
# PBT: <sweep dir>/lineage/<run>.json, for each run that continues a checkpoint: {run, step, values}.
LINEAGE = "lineage"


@dataclass
class SweepReport:
    results: dict[str, Any]
    markdown: str
    plots: dict[str, Path]
    best_run: Optional[Path]


def sweep_report(results: Any, section: SweepSection, dimensions: list[Dimension], sweep_dir: Path) -> SweepReport:
    failed = {match.group(2) for result in results if result.error
              for match in [TUNE_TRIAL_ID.search(Path(result.path).name)] if match}
    # The last step Tune heard from each trial: a stopped trial's workers may log a few more steps
    # before they are killed, after the scheduler decided; the ranking uses what Tune saw.
    heard = {match.group(2): (result.metrics or {}).get("step") for result in results
             for match in [TUNE_TRIAL_ID.search(Path(result.path).name)] if match}
    lineage = {path.stem: json.loads(path.read_text()) for path in sorted((sweep_dir / LINEAGE).glob("*.json"))}
    run_dirs = [run_dir for run_dir in sorted((sweep_dir / "trials").glob("trial*")) if (run_dir / "config.yaml").is_file()]
    rows = [trial_row(run_dir, section, dimensions, failed, heard, lineage.get(run_dir.name),
                      replaced_at(run_dir.name, run_dirs, lineage))
            for run_dir in run_dirs]
    ranked = [row for row in rows if row["best"] is not None]
    pick = max if section.mode == "max" else min
    best = pick(ranked, key=lambda row: row["best"]) if ranked else None
    # A trial the scheduler stopped may have no checkpoint Ray Train recorded: the best one to export
    # is the best with one.
    saved = [row for row in ranked if row["checkpoint"] is not None]
    exported = pick(saved, key=lambda row: row["best"]) if saved else None
    trained = sum(row["steps"] - row["start_step"] for row in rows)
    budget = sum({row["index"]: row["max_steps"] for row in rows}.values())
    summary = {"metric": section.metric, "mode": section.mode, "scheduler": section.scheduler,
               "trials": len({row["index"] for row in rows}), "runs": len(rows),
               "stopped_early": sum(row["status"] == "stopped early" for row in rows),
               "continued_from_another": sum(row["from"] is not None and not row["from"].startswith(f"trial{row['index']}-")
                                             for row in rows),
               "trial_steps": trained, "trial_steps_without_stopping": budget,
               "best_trial": best["trial"] if best else None, "best": best["best"] if best else None,
               "best_step": best["best_step"] if best else None,
               "best_trial_with_checkpoint": exported["trial"] if exported else None}
    figures = {"metric_vs_values": metric_plot(rows, section, dimensions, sweep_dir)} if ranked else {}
    best_run = sweep_dir / "trials" / exported["trial"] if exported else None
    return SweepReport({"summary": summary, "trials": rows}, markdown(rows, summary, figures, section, best_run),
                       figures, best_run)


def trial_index(run_name: str) -> str:
    return run_name.split("-", 1)[0].removeprefix("trial")


def replaced_at(name: str, run_dirs: list[Path], lineage: dict[str, dict[str, Any]]) -> Optional[int]:
    """Under PBT, the step at which a later run of the same trial took over from this one (it went
    on from a checkpoint of that step); None if none did."""
    def start(run_name: str) -> int:
        return lineage[run_name]["step"] if run_name in lineage else 0

    later = [start(run_dir.name) for run_dir in run_dirs
             if trial_index(run_dir.name) == trial_index(name) and start(run_dir.name) > start(name)]
    return min(later) if later else None


def trial_row(run_dir: Path, section: SweepSection, dimensions: list[Dimension], failed: set[str],
              heard: dict[str, Optional[int]], origin: Optional[dict[str, Any]] = None,
              replaced_at_step: Optional[int] = None) -> dict[str, Any]:
    config = saved_config(run_dir)
    values = {d.key: lookup(config, d.key) for d in dimensions}
    records = read_metrics(run_dir)
    summary = read_summary(run_dir)
    index = trial_index(run_dir.name)
    # Replaced comes first: under PBT a run's workers may still finish its last steps after Tune chose to
    # continue its trial from another run's checkpoint (Ray Train reports without pausing the loop).
    status = ("replaced" if replaced_at_step is not None else "finished" if run_outcome(summary).done
              else "failed" if index in failed or summary else "stopped early" if section.scheduler == "asha"
              else "interrupted")
    # A stopped trial, or a replaced PBT run, is ranked by what it reported before it was stopped
    # or replaced: its workers may log a step or an evaluation more before they are killed.
    last_seen = heard.get(index) if status == "stopped early" else replaced_at_step if status == "replaced" else None
    scores = [(m["step"], m[section.metric]) for m in records
              if isinstance(m.get(section.metric), (int, float)) and math.isfinite(m[section.metric])
              and (last_seen is None or m["step"] <= last_seen)]
    pick = max if section.mode == "max" else min
    best_step, best = pick(scores, key=lambda score: score[1]) if scores else (None, None)
    steps = max((m["step"] for m in records), default=0)  # at least: a stopped trial may log a step more
    start_step = origin["step"] if origin else 0
    return {"trial": run_dir.name, "index": index, **values, "best": best, "best_step": best_step,
            "start_step": start_step, "from": f"{origin['run']} at step {start_step}" if origin else None,
            "steps": max(steps, start_step), "max_steps": config["trainer"]["max_steps"], "status": status,
            "checkpoint": recorded_checkpoint(run_dir)}


def recorded_checkpoint(run_dir: Path) -> Optional[str]:
    """The latest checkpoint Ray Train recorded as complete, or None (a trial stopped before any was)."""
    try:
        return latest_checkpoint(run_dir).name
    except ConfigError:
        return None


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def metric_plot(rows: list[dict[str, Any]], section: SweepSection, dimensions: list[Dimension],
                sweep_dir: Path) -> Path:
    """The best metric of each trial against each searched key, one panel per key; trials the
    scheduler stopped drawn hollow."""
    figure, axes = figure_row(len(dimensions), 4.5)
    for axis, dimension in zip(axes, dimensions):
        for status, marker in (("finished", "o"), ("stopped early", "x"), ("replaced", "+"), ("failed", "s"),
                               ("interrupted", "^")):
            mine = [row for row in rows if row["status"] == status and row["best"] is not None]
            if mine:
                axis.scatter([str(row[dimension.key]) if dimension.kind in ("grid", "choice") else row[dimension.key]
                              for row in mine], [row["best"] for row in mine], marker=marker, label=status)
        if dimension.kind == "loguniform":
            axis.set_xscale("log")
        axis.set_xlabel(dimension.key)
        axis.set_ylabel(f"best {section.metric}")
        axis.legend(fontsize=8)
    return save_figure(figure, sweep_dir / "metric_vs_values.png")


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], figures: dict[str, Path], section: SweepSection,
             best_run: Optional[Path]) -> str:
    import pandas as pd

    saved = summary["trial_steps_without_stopping"] - summary["trial_steps"]
    lines = [f"# Sweep `{section.name}`", "",
             f"{summary['trials']} trials ranked by {section.metric} ({section.mode}); scheduler {section.scheduler}"
             + (f", which stopped {summary['stopped_early']} early: {summary['trial_steps']} trial-steps trained of "
                f"{summary['trial_steps_without_stopping']} without stopping ({saved} saved)."
                if section.scheduler == "asha" else
                f": {summary['continued_from_another']} times a trial continued from another's checkpoint, "
                f"perturbed; {summary['runs']} runs in all." if section.scheduler == "pbt" else "."), ""]
    if summary["best_trial"] is not None:
        lines += [f"**Best:** `{summary['best_trial']}`, {section.metric} = {summary['best']:.4g} at step "
                  f"{summary['best_step']}."]
        if best_run is not None and best_run.name != summary["best_trial"]:
            lines += [f"It was stopped before Ray Train recorded a checkpoint of it; the best trial with one is "
                      f"`{best_run.name}`."]
        if best_run is not None:
            lines += [f"Its weights: `distdl export {best_run} OUT_DIR --checkpoint best`."]
        lines += [""]
    frame = pd.DataFrame(rows).sort_values("best", ascending=section.mode == "min", na_position="last")
    frame = frame.drop(columns=["index", "start_step"] + ([] if section.scheduler == "pbt" else ["from"]))
    frame["checkpoint"] = frame["checkpoint"].fillna("none recorded")
    if "from" in frame:
        frame["from"] = frame["from"].fillna("its own start")
    lines += ["## Trials", "", frame.to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines + markdown_sections(figures))
