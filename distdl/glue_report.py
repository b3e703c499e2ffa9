"""The GLUE table from finished runs: `distdl report glue RUN_DIR ...`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from distdl.data import glue
from distdl.errors import ConfigError
from distdl.rundir import read_metrics, read_summary, saved_config

# The BERT paper's GLUE average (Devlin et al. 2019, table 1): one number per entry, MNLI's matched
# and mismatched sets counted as two entries, WNLI left out. Its BERT-base row averages to 79.6.
BERT_PAPER_ENTRIES: tuple[tuple[str, str, str], ...] = (
    ("MNLI-m", "mnli", "eval_matched_accuracy"),
    ("MNLI-mm", "mnli", "eval_mismatched_accuracy"),
    ("QQP", "qqp", "eval_f1"),
    ("QNLI", "qnli", "eval_accuracy"),
    ("SST-2", "sst2", "eval_accuracy"),
    ("CoLA", "cola", "eval_mcc"),
    ("STS-B", "stsb", "eval_spearman"),
    ("MRPC", "mrpc", "eval_f1"),
    ("RTE", "rte", "eval_accuracy"),
)
# What the GLUE leaderboard shows per task, in its order.
SHOWN: dict[str, tuple[str, tuple[str, ...]]] = {
    "cola": ("MCC", ("eval_mcc",)),
    "sst2": ("Acc", ("eval_accuracy",)),
    "mrpc": ("F1/Acc", ("eval_f1", "eval_accuracy")),
    "stsb": ("Pearson/Spearman", ("eval_pearson", "eval_spearman")),
    "qqp": ("F1/Acc", ("eval_f1", "eval_accuracy")),
    "mnli": ("Acc m/mm", ("eval_matched_accuracy", "eval_mismatched_accuracy")),
    "qnli": ("Acc", ("eval_accuracy",)),
    "rte": ("Acc", ("eval_accuracy",)),
    "wnli": ("Acc", ("eval_accuracy",)),
}


def bert_paper_average(scores: dict[tuple[str, str], float]) -> tuple[Optional[float], list[str]]:
    """The average over the entries present (as percentages), and the names of those missing."""
    present, missing = [], []
    for name, task, metric in BERT_PAPER_ENTRIES:
        value = scores.get((task, metric))
        if value is None or math.isnan(value):
            missing.append(name)
        else:
            present.append(value)
    return (sum(present) / len(present) if present else None), missing


def read_glue_run(run_dir: Path) -> dict[str, Any]:
    """A GLUE run's task, best dev metrics and name; errors name the directory. A run that never
    finished (a sweep's trial its scheduler stopped) is read from its logged evaluations."""
    config = saved_config(run_dir, "glue")
    summary = read_summary(run_dir)
    best = summary.get("best") or best_logged_evaluation(run_dir, glue.get_task(config["data"]["task"]).primary_metric)
    if best.get("step") is None:
        raise ConfigError(f"{run_dir} has no evaluated result yet (no best dev metrics in summary.json or "
                          "metrics.jsonl)")
    steps = summary.get("steps") or max((m["step"] for m in read_metrics(run_dir)), default=None)
    return {"run": run_dir.name, "task": config["data"]["task"], "metrics": best, "step": best["step"],
            "steps": steps}


def best_logged_evaluation(run_dir: Path, primary: str) -> dict[str, Any]:
    """The logged evaluation with the highest primary metric (the later one on a tie, as the loop
    keeps its best), in summary.json's `best` form; {} when none was logged."""
    evaluations = [m for m in read_metrics(run_dir) if isinstance(m.get(primary), (int, float))
                   and not math.isnan(m[primary])]
    if not evaluations:
        return {}
    top = max(reversed(evaluations), key=lambda m: m[primary])
    return {"step": top["step"], **{k: v for k, v in top.items() if k.startswith("eval_")}}


def glue_table(run_dirs: list[Path]) -> str:
    """Markdown: one row per task (its best run on dev when several), GLUE's metrics x 100, the average."""
    best_runs: dict[str, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run = read_glue_run(Path(run_dir))
        primary = glue.get_task(run["task"]).primary_metric
        current = best_runs.get(run["task"])
        if current is None or _score(run, primary) > _score(current, primary):
            best_runs[run["task"]] = run
    lines = ["| Task | Metric | Dev | Run | Best step |", "|---|---|---|---|---|"]
    for task, (label, keys) in SHOWN.items():
        if task not in best_runs:
            continue
        run = best_runs[task]
        values = "/".join(_percent(run["metrics"].get(k)) for k in keys)
        lines.append(f"| {glue.TASKS[task].folder} | {label} | {values} | {run['run']} | {run['step']} |")
    scores = {(task, key): 100 * value for task, run in best_runs.items()
              for key, value in run["metrics"].items() if isinstance(value, (int, float))}
    average, missing = bert_paper_average(scores)
    entries = len(BERT_PAPER_ENTRIES)
    if average is None:
        lines.append("\nNo task of the BERT paper's average (the GLUE tasks but WNLI) is among these runs.")
    else:
        note = f" over {entries - len(missing)} of its {entries} entries; missing: {', '.join(missing)}" if missing else ""
        lines.append(f"\nAverage as in the BERT paper (MNLI-m and -mm as two entries, WNLI left out): "
                     f"{average:.1f}{note}")
    return "\n".join(lines)


def _score(run: dict[str, Any], key: str) -> float:
    value = run["metrics"].get(key)
    return -math.inf if value is None or math.isnan(value) else value


def _percent(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
