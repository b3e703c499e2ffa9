"""Figures as PNG files (matplotlib without a display), and the markdown that shows them: for the
studies', sweeps' and plans' reports alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown_sections(figures: dict[str, Path], suffix: str = "") -> list[str]:
    """A report's section per figure: a heading from its name, and the image."""
    lines = []
    for name, path in figures.items():
        lines += [f"## {name.replace('_', ' ').capitalize()}{suffix}", "", f"![{name}]({path.name})", ""]
    return lines


def figure_row(columns: int = 1, width: float = 5.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width * columns, 4), squeeze=False)
    return figure, axes[0]


def save_figure(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
