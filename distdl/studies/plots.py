"""The studies' figures, as PNG files in the study directory (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from distdl.figures import figure_row, save_figure


def eps_name(eps: float) -> str:
    """1e-3 -> '1e-3', 5e-4 -> '5e-4': the keys results.json uses."""
    mantissa, exponent = f"{eps:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"

def sharpness_against_batch(frame: Any, section: Any, study_dir: Path) -> Path:
    """Sharpness, top Hessian eigenvalue and test accuracy against batch size, one line per protocol."""
    eps = eps_name(section.epsilons[0])
    panels = [(f"sharpness_eps{eps}", f"sharpness (eps={eps})", True),
              ("hessian_top_eigenvalue", "top Hessian eigenvalue", True),
              ("test_accuracy", "test accuracy", False)]
    figure, axes = figure_row(len(panels), 4.2)
    for axis, (column, label, log) in zip(axes, panels):
        for protocol, group in frame.groupby("protocol"):
            means = group.groupby("batch_size")[column].mean()
            axis.plot(means.index, means.values, marker="o", label=protocol)
            axis.scatter(group.batch_size, group[column], s=12, alpha=0.5)
        axis.set_xscale("log")
        if log and (frame[column] > 0).all():
            axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_title(label)
    axes[0].legend()
    return save_figure(figure, study_dir / "sharpness_vs_batch_size.png")


def variant_gaps(gaps: Any, study_dir: Path) -> Path:
    """Each large-batch arm's test-accuracy gap to the small batch, and its top-eigenvalue and adaptive
    sharpness ratios, one dot per seed and a bar for the mean, per protocol."""
    adaptive = next((c for c in gaps.columns if c.startswith("adaptive_sharpness") and c.endswith("_ratio")), None)
    panels = [("test_accuracy_gap", "test accuracy minus the small batch's", False),
              ("hessian_top_eigenvalue_ratio", "top eigenvalue over the small batch's", True)]
    if adaptive:
        panels.append((adaptive, "adaptive sharpness over the small batch's", True))
    figure, axes = figure_row(len(panels), 4.6)
    arms = list(dict.fromkeys(gaps.arm))
    protocols = list(dict.fromkeys(gaps.protocol))
    width = 0.8 / len(protocols)
    for axis, (column, title, ratio) in zip(axes, panels):
        for index, protocol in enumerate(protocols):
            mine = gaps[gaps.protocol == protocol]
            positions = np.arange(len(arms)) + (index - (len(protocols) - 1) / 2) * width
            means = [mine[mine.arm == arm][column].mean() for arm in arms]
            axis.bar(positions, means, width, bottom=0.0, alpha=0.5, color=f"C{index}", label=protocol)
            for position, arm in zip(positions, arms):
                values = mine[mine.arm == arm][column]
                axis.scatter([position] * len(values), values, s=10, color=f"C{index}")
        axis.axhline(1.0 if ratio else 0.0, color="grey", lw=0.6)  # the small batch's level
        axis.set_xticks(range(len(arms)), arms, rotation=20, ha="right", fontsize=7)
        axis.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    return save_figure(figure, study_dir / "variants.png")


def temperature_heatmaps(frame: Any, fits: dict[str, dict[str, Any]], study_dir: Path) -> Path:
    """One heat map per fitted measure over (batch size, learning rate), log axes, the mean over seeds
    in each cell, with dashed lines of constant lr/B through the grid's cells and the fitted k."""
    from matplotlib.colors import LogNorm

    batches, rates = sorted(frame.batch_size.unique()), sorted(frame.lr.unique())
    figure, axes = figure_row(len(fits), 4.4)
    for axis, (key, fit) in zip(axes, fits.items()):
        means = frame.groupby(["lr", "batch_size"])[key].mean()
        grid = np.array([[means.get((lr, batch), np.nan) for batch in batches] for lr in rates])
        norm = LogNorm(np.nanmin(grid), np.nanmax(grid)) if fit["log"] else None
        mesh = axis.pcolormesh(_edges(batches), _edges(rates), grid, norm=norm, cmap="viridis", shading="flat")
        for i, lr in enumerate(rates):
            for j, batch in enumerate(batches):
                axis.text(batch, lr, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=6, color="white")
        for ratio in sorted({lr / batch for lr in rates for batch in batches}):
            axis.plot(batches, [ratio * batch for batch in batches], "w--", lw=0.6)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(_edges(batches)[0], _edges(batches)[-1])
        axis.set_ylim(_edges(rates)[0], _edges(rates)[-1])
        axis.set_xlabel("batch size B")
        axis.set_title(f"{key}\nk = {fit['exponent']:.2f} [{fit['interval'][0]:.2f}, {fit['interval'][1]:.2f}]",
                       fontsize=8)
        figure.colorbar(mesh, ax=axis)
    axes[0].set_ylabel("learning rate")
    return save_figure(figure, study_dir / "temperature_heatmaps.png")


def _edges(values: list[float]) -> np.ndarray:
    """Cell edges around log-spaced centres: geometric midpoints, and as far again at both ends."""
    logs = np.log(np.asarray(values, float))
    middle = (logs[1:] + logs[:-1]) / 2
    return np.exp(np.concatenate([[2 * logs[0] - middle[0]], middle, [2 * logs[-1] - middle[-1]]]))


def interpolation_curves(curves: dict[str, dict[str, Any]], study_dir: Path) -> Path:
    """Keskar's Figure 3: loss (log scale) and accuracy from the small-batch solution (alpha 0) to the
    large-batch one (alpha 1), and beyond on both sides."""
    figure, axes = figure_row(len(curves), 4.5)
    twins = []
    for axis, (title, curve) in zip(axes, curves.items()):
        rows = curve["rows"]
        alphas = [r["alpha"] for r in rows]
        for split, style in (("train", "-"), ("test", "--")):
            axis.plot(alphas, [r[f"{split}_loss"] for r in rows], "C0" + style, label=f"{split} loss")
        axis.set_yscale("log")
        axis.set_xlabel("alpha (0: small batch, 1: large batch)")
        axis.set_title(title)
        twin = axis.twinx()
        twins.append(twin)
        for split, style in (("train", "-"), ("test", "--")):
            twin.plot(alphas, [r[f"{split}_accuracy"] for r in rows], "C1" + style, label=f"{split} accuracy")
        twin.set_ylim(0, 1)
        twin.set_ylabel("accuracy")
        axis.set_ylabel("loss")
    lines = [*axes[0].get_lines(), *twins[0].get_lines()]
    axes[0].legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=7)
    return save_figure(figure, study_dir / "interpolation.png")


def landscape_lines(landscapes: dict[str, dict[str, Any]], study_dir: Path) -> Path:
    """Li et al.'s 1-D plots: training loss (log scale) along one filter-normalized direction through
    each solution, all on one axis."""
    figure, (axis,) = figure_row(1, 5.5)
    colours = _colours(len(landscapes))
    for colour, (name, landscape) in zip(colours, landscapes.items()):
        axis.plot(landscape["coordinates"], landscape["loss"], color=colour, label=name)
    axis.set_yscale("log")
    axis.set_xlabel("step along a filter-normalized direction")
    axis.set_ylabel("training loss")
    axis.legend(fontsize=7)
    return save_figure(figure, study_dir / "landscape_1d.png")


def landscape_contours(landscapes: dict[str, dict[str, Any]], study_dir: Path) -> Path:
    """Li et al.'s 2-D contour plots, one panel per solution, on one logarithmic colour scale for all,
    so that a wider basin reads as a wider dark region whichever solution it is."""
    from matplotlib.colors import LogNorm

    surfaces = {name: np.asarray(landscape["loss"]) for name, landscape in landscapes.items()}
    every = np.concatenate([surface.ravel() for surface in surfaces.values()])
    low, high = max(every[every > 0].min(initial=np.inf), 1e-12), every.max()
    levels = np.geomspace(low, max(high, low * 1.001), 20)
    norm = LogNorm(levels[0], levels[-1])
    import matplotlib.pyplot as plt

    columns = min(4, len(surfaces))
    rows = -(-len(surfaces) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.6 * columns + 1, 3.4 * rows), squeeze=False)
    axes = list(grid.ravel())
    for axis in axes[len(surfaces):]:
        axis.set_visible(False)
    for axis, (name, surface) in zip(axes, surfaces.items()):
        coordinates = landscapes[name]["coordinates"]
        # Indexed [a][b]: a along the first direction (x), b along the second (y).
        filled = axis.contourf(coordinates, coordinates, np.clip(surface, low, None).T, levels=levels, norm=norm,
                               cmap="viridis")
        axis.plot([0], [0], "w+", markersize=10)
        axis.set_title(name, fontsize=8)
        axis.set_aspect("equal")
        axis.tick_params(labelsize=7)
    for row in grid:
        row[0].set_ylabel("direction 2", fontsize=8)
    for axis in grid[-1]:
        axis.set_xlabel("direction 1", fontsize=8)
    figure.colorbar(filled, ax=axes, label="training loss", ticks=levels[::4], format="%.3g")
    figure.savefig(study_dir / "landscape_2d.png", dpi=120)
    plt.close(figure)
    return study_dir / "landscape_2d.png"


def noise_scale_curves(run_dirs: dict[str, Path], study_dir: Path) -> Optional[Path]:
    """B_simple over training per trial (log scale), where training logged it."""
    from distdl.rundir import read_metrics

    figure, (axis,) = figure_row()
    drawn = False
    for name, run_dir in run_dirs.items():
        points = [(m["step"], m["noise_scale"]) for m in read_metrics(run_dir)
                  if m.get("noise_scale") is not None and m["noise_scale"] > 0]
        if points:
            steps, values = np.array(points).T
            axis.plot(steps / steps.max(), values, label=name)
            drawn = True
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(figure)
        return None
    axis.set_yscale("log")
    axis.set_xlabel("fraction of training")
    axis.set_ylabel("B_simple (examples)")
    axis.set_title("gradient noise scale")
    axis.legend(fontsize=7)
    return save_figure(figure, study_dir / "noise_scale.png")


def loss_curves(curves: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], study_dir: Path) -> Path:
    """Training loss against step per width, on a log scale: a straight line is linear convergence."""
    figure, (axis,) = figure_row()
    widths = sorted({width for width, _ in curves})
    colours = _colours(len(widths))
    for (width, seed), (steps, losses) in sorted(curves.items()):
        axis.plot(steps, losses, color=colours[widths.index(width)], label=f"width {width}" if seed == min(
            s for w, s in curves if w == width) else None)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.legend(fontsize=7)
    return save_figure(figure, study_dir / "loss_curves.png")


def distance_against_width(frame: Any, exponent: float, intercept: float, study_dir: Path) -> Path:
    figure, (axis,) = figure_row()
    axis.scatter(frame.width, frame.relative_distance, label="||W - W0|| / ||W0||")
    if np.isfinite(exponent):
        widths = np.geomspace(frame.width.min(), frame.width.max(), 50)
        axis.plot(widths, np.exp(intercept) * widths**exponent, "--", label=f"fit: width^{exponent:.2f}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("width")
    axis.set_ylabel("relative distance from initialization")
    axis.legend()
    return save_figure(figure, study_dir / "distance_vs_width.png")


def error_against_width(frame: Any, study_dir: Path) -> Path:
    """Train and test error (and the share of ReLU patterns that changed) against width."""
    figure, axes = figure_row(2, 4.5)
    means = frame.groupby("width").mean(numeric_only=True)
    axes[0].plot(means.index, means.train_error, "o-", label="train error")
    axes[0].plot(means.index, means.test_error, "o-", label="test error")
    axes[0].set_title("error")
    axes[0].legend()
    if means.activation_change.notna().any():
        axes[1].plot(means.index, means.activation_change, "o-", color="C2")
        axes[1].set_yscale("log")
    axes[1].set_title("ReLU patterns changed by training")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("width")
    return save_figure(figure, study_dir / "error_vs_width.png")


def _colours(count: int) -> list[Any]:
    import matplotlib

    return [matplotlib.colormaps["viridis"](i / max(count - 1, 1)) for i in range(count)]


def throughput_against_workers(frame: Any, study_dir: Path) -> Path:
    """Samples/s against workers (with the ideal line from the fewest workers), and the efficiency."""
    figure, axes = figure_row(2, 4.5)
    for kind, group in frame.groupby("kind"):
        line = axes[0].plot(group.workers, group.samples_per_s, "o-", label=f"{kind} scaling")[0]
        first = group.iloc[0]
        ideal = first.samples_per_s * group.workers / first.workers
        axes[0].plot(group.workers, ideal, ":", color=line.get_color())
        axes[1].plot(group.workers, group.efficiency, "o-", label=f"{kind} scaling")
    axes[0].set_ylabel("samples/s (dotted: ideal)")
    axes[1].set_ylabel("efficiency")
    axes[1].axhline(1.0, color="grey", lw=0.5)
    axes[1].set_ylim(0, 1.2)
    for axis in axes:
        axis.set_xlabel("workers")
        axis.legend()
    return save_figure(figure, study_dir / "throughput.png")


def steps_against_batch(curve: Any, fits: dict[str, dict[str, Any]], target: float, study_dir: Path) -> Path:
    """Steps to the target loss against the global batch (log-log), one colour per optimizer: the
    runs, the fitted curve and both estimates of the critical batch size."""
    figure, (axis,) = figure_row(1, 5.5)
    batches = np.geomspace(curve.batch_size.min(), curve.batch_size.max(), 50)
    for index, (name, group) in enumerate(curve.groupby("optimizer", sort=False)):
        colour, fit, label = f"C{index}", fits[name], name if len(fits) > 1 else "measured"
        reached = group.dropna(subset=["steps_to_target"])
        axis.scatter(reached.batch_size, reached.steps_to_target, color=colour, label=label)
        if fit.get("min_steps") and np.isfinite(fit["min_steps"]):
            axis.plot(batches, fit["min_steps"] * (1 + fit["critical_batch_size"] / batches), "--", color=colour,
                      label=f"S_min (1 + B_crit/B), B_crit = {fit['critical_batch_size']:.3g}")
            axis.axvline(fit["critical_batch_size"], color=colour, lw=0.8)
        if fit.get("noise_scale_batch"):
            axis.axvline(fit["noise_scale_batch"], color=colour, lw=0.8, ls=":",
                         label=f"noise scale B_simple = {fit['noise_scale_batch']:.3g}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("global batch size")
    axis.set_ylabel(f"steps to training loss {target}")
    axis.legend(fontsize=7)
    return save_figure(figure, study_dir / "steps_to_target.png")
