"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A.1),
in one place: the loop estimates its two terms at every step of a data-parallel run, and the
studies read them back from the run's metrics.

Each rank's own gradient (over its per-rank batch) and the all-reduced one (over the global batch)
are two gradients of different batch sizes, which is all the unbiased estimator needs; so the
estimate costs no extra backward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from distdl.rundir import read_metrics

# The metrics a step logs: the two unbiased terms, and their ratio over a log window.
GRADIENT_SQ, TRACE, NOISE_SCALE = "noise_gradient_sq", "noise_trace", "noise_scale"


def noise_scale_terms(small_sq_norm: float, large_sq_norm: float, small_batch: int,
                      large_batch: int) -> tuple[float, float]:
    """Unbiased estimates of |G|^2 and tr(Sigma) (McCandlish et al. 2018, eqs. A.2-A.3) from
    |G_small|^2 (a gradient over `small_batch` examples; average it over ranks) and |G_large|^2
    (over `large_batch`). B_simple = tr(Sigma) / |G|^2; average both over steps before dividing."""
    if not 0 < small_batch < large_batch:
        raise ValueError(f"need 0 < small batch ({small_batch}) < large batch ({large_batch})")
    gradient_sq = (large_batch * large_sq_norm - small_batch * small_sq_norm) / (large_batch - small_batch)
    trace = (small_sq_norm - large_sq_norm) / (1 / small_batch - 1 / large_batch)
    return gradient_sq, trace


def step_terms(rank_sq_norm: float, reduced_sq_norm: float, rank_batch: int, global_batch: int) -> dict[str, float]:
    """One step's terms, as the metrics the loop logs, from this rank's and the all-reduced gradient."""
    gradient_sq, trace = noise_scale_terms(rank_sq_norm, reduced_sq_norm, rank_batch, global_batch)
    return {GRADIENT_SQ: gradient_sq, TRACE: trace}


def with_noise_scale(metrics: dict[str, float]) -> dict[str, float]:
    """B_simple from a log window's mean terms (the ratio of means, as McCandlish et al. advise)."""
    if TRACE in metrics:
        metrics[NOISE_SCALE] = metrics[TRACE] / metrics[GRADIENT_SQ]
    return metrics


def late_noise_terms(run_dir: Path) -> Optional[tuple[float, float]]:
    """The mean tr(Sigma) and |G|^2 over the second half of a run's training (its logged windows), or
    None for a run that logged none."""
    windows = [m for m in read_metrics(run_dir) if TRACE in m]
    if not windows:
        return None
    late = windows[len(windows) // 2 :]
    return float(np.mean([m[TRACE] for m in late])), float(np.mean([m[GRADIENT_SQ] for m in late]))


def noise_scale_of_run(run_dir: Path) -> Optional[float]:
    """B_simple over the second half of a run's training: the ratio of the mean tr(Sigma) and |G|^2
    (McCandlish et al. average numerator and denominator apart; single windows are noisy)."""
    terms = late_noise_terms(run_dir)
    if terms is None:
        return None
    trace, gradient_sq = terms
    return trace / gradient_sq if gradient_sq > 0 else None
