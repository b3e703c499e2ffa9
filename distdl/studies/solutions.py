"""How a trained solution is measured, for the studies that compare solutions (sharpness and
temperature): the trial's final weights in float64, loss oracles on its training measurement set and
its eval set, and every measure of flatness on them (distdl.studies.measures)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from annotated_types import Ge, Gt, Interval, MinLen

from distdl.config import AtLeastOne, Finite, Requirement
from distdl.studies.base import StudySection, trained_workload
from distdl.studies.measures import (
    MIN_HESSIAN_PRODUCTS,
    LossOracle,
    epsilon_sharpness,
    filter_normalized_direction,
    hessian_top_eigenvalue,
    hessian_trace,
    loss_landscape,
    random_subspace,
)
from distdl.studies.plots import eps_name


@dataclass
class MeasurementSection(StudySection):
    """How every solution is measured (the sharpness and temperature studies share it)."""

    epsilons: Annotated[list[Annotated[float, Interval(gt=0, lt=1)]], MinLen(1)] = field(
        default_factory=lambda: [1e-3, 5e-4])
    # The random subspace's dimension for the subspace sharpness (Keskar et al. use 100); 0: skip.
    subspace_dimension: Annotated[int, Ge(0), Requirement("must be 0 (skip) or more")] = 100
    # L-BFGS-B iterations per sharpness (Keskar et al.: 10).
    sharpness_iterations: AtLeastOne = 10
    # The first this-many training examples are the measurements' training set (all, if fewer).
    measure_examples: AtLeastOne = 10000
    measure_batch_size: AtLeastOne = 500
    # The top eigenvalue (LOBPCG): at most this many Hessian-vector products, stopping once the residual
    # |H v - lambda v| falls to this tolerance times the Hessian's scale (measures.hessian_top_eigenvalue).
    hessian_products: Annotated[int, Ge(MIN_HESSIAN_PRODUCTS),
                                Requirement(f"must be {MIN_HESSIAN_PRODUCTS} or more (LOBPCG's least)")] = 100
    hessian_tolerance: Annotated[float, Interval(gt=0, lt=1)] = 1e-3
    # Rademacher vectors for Hutchinson's trace estimate.
    trace_samples: AtLeastOne = 20
    # Loss landscapes around each solution along filter-normalized random directions (Li et al. 2018),
    # at coordinates in [-landscape_span, landscape_span]: this many points on a line, and a grid of
    # this many points a side on a plane (each point one pass over the measurement set); 0: skip.
    landscape_points: Annotated[int, Ge(0), Requirement("must be 0 (skip) or more")] = 25
    landscape_grid: Annotated[int, Ge(0), Requirement("must be 0 (skip) or more")] = 11
    landscape_span: Annotated[float, Gt(0), Finite] = 1.0



def measured_solution(trial_config: dict[str, Any], section: MeasurementSection,
                      context: Any) -> tuple[Any, dict[str, LossOracle]]:
    """A trial's trained model in float64 (the rises measured are far below float32's resolution of
    the loss), and loss oracles on its training measurement set and its whole eval set."""
    workload, model = trained_workload(trial_config, context)
    model = model.double()
    oracles = {split: LossOracle(model, [(x.double(), y) for x, y in workload.measurement_batches(
                   split, section.measure_examples if split == "train" else None, section.measure_batch_size)],
                   workload.loss_sum, context.device)
               for split in ("train", "eval")}
    return model, oracles


def measure_solution(train: LossOracle, test: LossOracle, section: MeasurementSection, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {}
    for name, oracle in (("train", train), ("test", test)):
        result = oracle.evaluate()
        out[f"{name}_loss"], out[f"{name}_accuracy"] = result.loss, result.accuracy
    basis = random_subspace(train.size, section.subspace_dimension, seed) if section.subspace_dimension else None
    for eps in section.epsilons:
        key = eps_name(eps)
        out[f"sharpness_eps{key}"] = epsilon_sharpness(train, eps, iterations=section.sharpness_iterations)
        out[f"adaptive_sharpness_eps{key}"] = epsilon_sharpness(train, eps, adaptive=True,
                                                                iterations=section.sharpness_iterations)
        if basis is not None:
            out[f"subspace_sharpness_eps{key}"] = epsilon_sharpness(train, eps, subspace=basis,
                                                                    iterations=section.sharpness_iterations)
    top = hessian_top_eigenvalue(train, section.hessian_tolerance, section.hessian_products, seed)
    out["hessian_top_eigenvalue"], out["hessian_top_eigenvalue_residual"] = top.value, top.residual
    out["hessian_products_spent"], out["hessian_converged"] = top.products, top.converged
    out["hessian_trace"], out["hessian_trace_stderr"] = hessian_trace(train, section.trace_samples, seed)
    out["parameter_norm"], out["parameter_count"] = float(train.parameters().norm()), train.size
    out.update(landscapes(train, section, seed))
    out["measure_seconds"] = time.perf_counter() - started
    return out


def landscapes(train: LossOracle, section: MeasurementSection, seed: int) -> dict[str, Any]:
    """The training loss on a line and on a plane through the solution (Li et al. 2018)."""
    out = {}
    first, second = (filter_normalized_direction(train.params, seed * 2 + k) for k in (0, 1))
    for key, count, directions in (("landscape_1d", section.landscape_points, [first]),
                                   ("landscape_2d", section.landscape_grid, [first, second])):
        if count:
            out[key] = loss_landscape(train, directions,
                                      np.linspace(-section.landscape_span, section.landscape_span, count))
    return out
