"""plan.png: throughput, scaling efficiency, time to target and GPU-hours against the GPU count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distdl.figures import figure_row, save_figure


def plot_plan(plan: dict[str, Any], path: Path) -> Path:
    rows = plan["rows"]
    gpus = [row["gpus"] for row in rows]
    timed = plan["scaling"] is not None
    figure, axes = figure_row(4 if timed else 2, 3.8)
    one = rows[0]["samples_per_s"] / rows[0]["gpus"] if rows else 0.0
    axes[0].plot(gpus, [row["samples_per_s"] for row in rows], "o-", label="predicted")
    axes[0].plot(gpus, [one * n for n in gpus], ":", color="grey", label="ideal")
    axes[0].set(xscale="log", yscale="log", ylabel="samples/s")
    axes[0].legend()
    axes[1].plot(gpus, [row["efficiency"] for row in rows], "o-")
    # Above 1 where ZeRO's split optimizer step saves more than the synchronization costs.
    axes[1].set(xscale="log", ylim=(0, max([1.05, *(row["efficiency"] + 0.05 for row in rows)])),
                ylabel="scaling efficiency")
    if timed:
        axes[2].plot(gpus, [row["time_to_target_s"] / 3600 for row in rows], "o-")
        axes[2].set(xscale="log", yscale="log", ylabel=f"hours to loss {plan['scaling']['target_loss']}")
        axes[3].plot(gpus, [row["gpu_hours"] for row in rows], "o-")
        axes[3].set(xscale="log", yscale="log", ylabel="GPU-hours")
        for axis, name, style in ((axes[2], "fastest_gpus", "--"), (axes[3], "knee_gpus", "-.")):
            if plan[name] is not None:
                axis.axvline(plan[name], color="C3", ls=style, label=f"{name.split('_')[0]}: {plan[name]} GPUs")
                axis.legend()
    for axis in axes:
        axis.set_xlabel("GPUs")
    figure.suptitle(f"{Path(plan['config']).name} on {plan['cluster']['name']}")
    return save_figure(figure, path)
