"""The studies' figures, as PNG files in the study directory (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np


def _figure(columns: int = 1, width: float = 5.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width * columns, 4), squeeze=False)
    return figure, axes[0]


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def sharpness_against_batch(frame: Any, section: Any, study_dir: Path) -> Path:
    """Sharpness, top Hessian eigenvalue and test accuracy against batch size, one line per protocol."""
    from distdl.studies.sharpness import eps_name

    eps = eps_name(section.epsilons[0])
    panels = [(f"sharpness_eps{eps}", f"sharpness (eps={eps})", True),
              ("hessian_top_eigenvalue", "top Hessian eigenvalue", True),
              ("test_accuracy", "test accuracy", False)]
    figure, axes = _figure(len(panels), 4.2)
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
    return _save(figure, study_dir / "sharpness_vs_batch_size.png")


def interpolation_curves(curves: dict[str, dict[str, Any]], study_dir: Path) -> Path:
    """Keskar's Figure 3: loss (log scale) and accuracy from the small-batch solution (alpha 0) to the
    large-batch one (alpha 1), and beyond on both sides."""
    figure, axes = _figure(len(curves), 4.5)
    for axis, (title, curve) in zip(axes, curves.items()):
        rows = curve["rows"]
        alphas = [r["alpha"] for r in rows]
        for split, style in (("train", "-"), ("test", "--")):
            axis.plot(alphas, [r[f"{split}_loss"] for r in rows], "C0" + style, label=f"{split} loss")
        axis.set_yscale("log")
        axis.set_xlabel("alpha (0: small batch, 1: large batch)")
        axis.set_title(title)
        twin = axis.twinx()
        for split, style in (("train", "-"), ("test", "--")):
            twin.plot(alphas, [r[f"{split}_accuracy"] for r in rows], "C1" + style, label=f"{split} accuracy")
        twin.set_ylim(0, 1)
        twin.set_ylabel("accuracy")
        axis.set_ylabel("loss")
    lines = [line for axis in figure.axes for line in axis.get_lines()][:4]
    axes[0].legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=7)
    return _save(figure, study_dir / "interpolation.png")


def noise_scale_curves(run_dirs: dict[str, Path], study_dir: Path) -> Optional[Path]:
    """B_simple over training per trial (log scale), where training logged it."""
    from distdl.tracking import read_metrics

    figure, (axis,) = _figure()
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
    return _save(figure, study_dir / "noise_scale.png")
