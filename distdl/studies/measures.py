"""Measurements of a trained solution, data-parallel: each rank holds a shard of the examples, and
every loss, gradient and Hessian-vector product is summed across ranks before a solver sees it.

The solvers (scipy's LOBPCG and L-BFGS-B, Hutchinson's estimator) run on rank 0 only; the other
ranks follow it in `Lockstep`, applying whatever vector rank 0 broadcasts. So every rank does the
same number of collective operations whatever the solver does, and all get rank 0's answer.

- `hessian_top_eigenvalue`: the largest Hessian eigenvalue, by LOBPCG on Hessian-vector products
  (scipy's lobpcg: a Krylov-like method that converges in about as few products as Lanczos, far
  fewer than power iteration, and whose budget counts products and keeps its best estimate).
- `hessian_trace`: Hutchinson's estimator, E[v^T H v] over Rademacher vectors v.
- `loss_landscape`: the loss on a line or a plane through the solution along filter-normalized
  random directions (Li et al. 2018).
- `epsilon_sharpness`: Keskar et al. 2017, Metric 2.1: the largest rise of the loss within the box
  |y_i| <= eps (|x_i| + 1) around the solution x (in the full space, or in a random subspace y = A z
  with the box taken on A^+ x), over 1 + f(x), times 100; maximized with L-BFGS-B as in the paper.
  With `adaptive=True` the box is |y_i| <= eps |x_i| (the adaptive sharpness of Kwon et al. 2021):
  unchanged by the rescalings of a ReLU network that Dinh et al. 2017 used to make raw sharpness
  arbitrary, since the box rescales with the weights.

Everything runs in float64, the model included: the rises measured are far below float32's
resolution of the loss.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from distdl.collectives import all_reduce_sum, broadcast_object, distributed, rank

Batch = tuple[torch.Tensor, torch.Tensor]
Vector = torch.Tensor


class Lockstep:
    """Rank 0 calls `apply` as a solver needs it; the other ranks `follow()`, applying the same
    vectors, until rank 0 calls `finish(result)`, which hands them the result."""

    def __init__(self, apply: Callable[[Vector], Vector], size: int, device: torch.device) -> None:
        self._apply, self.size, self.device = apply, size, device

    def __call__(self, vector: Vector) -> Vector:
        if distributed():
            dist.broadcast(torch.ones(1, device=self.device), 0)
            vector = vector.to(self.device, torch.float64).contiguous()
            dist.broadcast(vector, 0)
        return self._apply(vector)

    def follow(self) -> object:
        """Other ranks: apply until rank 0 finishes; return its result."""
        while True:
            more = torch.zeros(1, device=self.device)
            dist.broadcast(more, 0)
            if not more.item():
                break
            vector = torch.empty(self.size, dtype=torch.float64, device=self.device)
            dist.broadcast(vector, 0)
            self._apply(vector)
        return broadcast_object(None)

    def finish(self, result: object) -> object:
        if distributed():
            dist.broadcast(torch.zeros(1, device=self.device), 0)
            return broadcast_object(result)
        return result


class SolverFailed(RuntimeError):
    """Rank 0's solver raised; every other rank raises this too instead of waiting for it."""


def in_lockstep(apply: Callable[[Vector], Vector], size: int, device: torch.device,
                solve: Callable[[Lockstep], object]) -> object:
    """Run `solve(operator)` on rank 0 with every other rank serving the operator; all get the result.
    If the solver raises on rank 0, rank 0 re-raises it and the other ranks raise `SolverFailed`."""
    operator = Lockstep(apply, size, device)
    if distributed() and rank() != 0:
        result = operator.follow()
        if isinstance(result, SolverFailed):
            raise result
        return result
    try:
        result = solve(operator)
    except Exception as error:
        operator.finish(SolverFailed(f"rank 0's solver failed: {type(error).__name__}: {error}"))
        raise
    return operator.finish(result)


@dataclass
class Evaluation:
    loss: float
    accuracy: float


class LossOracle:
    """The mean loss of `model` over every rank's examples, at the current or any given parameters.

    `model` should be in eval mode (batch norm with its running statistics), so the loss is a fixed
    function of the parameters. `loss_sum(model, batch)` returns the summed loss and correct count.
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence[Batch],
                 loss_sum: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> None:
        self.model, self.batches, self.loss_sum, self.device = model, batches, loss_sum, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.size = sum(p.numel() for p in self.params)
        local = sum(len(labels) for _, labels in batches)
        self.count = int(all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64, device=device)).item())

    def parameters(self) -> Vector:
        return parameters_to_vector(self.params).detach().to(torch.float64)

    def set_parameters(self, vector: Vector) -> None:
        with torch.no_grad():
            vector_to_parameters(vector.to(self.params[0].dtype), self.params)

    def evaluate(self) -> Evaluation:
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in self.batches:
                loss, correct = self.loss_sum(self.model, batch)
                totals += torch.stack([loss.double(), correct.double()])
        loss, correct = all_reduce_sum(totals).tolist()
        return Evaluation(loss / self.count, correct / self.count)

    def loss_and_gradient(self) -> Vector:
        """[mean loss, gradient...] in one float64 vector (one all-reduce)."""
        total = torch.zeros(1 + self.size, dtype=torch.float64, device=self.device)
        for batch in self.batches:
            loss, _ = self.loss_sum(self.model, batch)
            gradients = torch.autograd.grad(loss, self.params)
            total[0] += loss.detach().double()
            total[1:] += parameters_to_vector(gradients).double()
        return all_reduce_sum(total) / self.count

    def hessian_vector_product(self, vector: Vector) -> Vector:
        """H v of the mean loss (Pearlmutter's trick: the gradient of g . v)."""
        product = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        direction = vector.to(self.device, self.params[0].dtype)
        for batch in self.batches:
            loss, _ = self.loss_sum(self.model, batch)
            gradients = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = parameters_to_vector(gradients) @ direction
            product += parameters_to_vector(torch.autograd.grad(dot, self.params)).double()
        return all_reduce_sum(product) / self.count


@dataclass
class EigenEstimate:
    """An eigenvalue estimate: its residual |H v - value v| (v a unit vector), the Hessian-vector
    products spent, and whether the residual reached the tolerance."""

    value: float
    residual: float
    products: int
    converged: bool


# scipy's lobpcg spends 3 products beyond one per iteration (the start and the final Rayleigh-Ritz
# step); distdl spends one more to set the tolerance's scale.
_LOBPCG_EXTRA_PRODUCTS = 4
MIN_HESSIAN_PRODUCTS = _LOBPCG_EXTRA_PRODUCTS + 1


def hessian_top_eigenvalue(oracle: LossOracle, tolerance: float = 1e-3, max_products: int = 200,
                           seed: int = 0) -> EigenEstimate:
    """The largest (algebraic) eigenvalue of the Hessian of the mean loss at the current parameters,
    in at most `max_products` Hessian-vector products.

    It stops once the residual |H v - value v| falls to `tolerance` times |H v0| / |v0| for the random
    start v0 (a lower bound on |H|): the estimate is then that close to an eigenvalue of H, and to
    the top one within its square over the spectral gap. Out of products, it returns the best
    estimate found, with its residual, and warns."""
    from scipy.sparse.linalg import LinearOperator, lobpcg

    if max_products < MIN_HESSIAN_PRODUCTS:
        raise ValueError(f"max_products={max_products}: LOBPCG needs at least {MIN_HESSIAN_PRODUCTS} "
                         "Hessian-vector products")

    def solve(operator: Lockstep) -> EigenEstimate:
        spent = 0

        def product(vector: np.ndarray) -> np.ndarray:
            nonlocal spent
            spent += 1
            return operator(torch.from_numpy(np.ravel(vector))).cpu().numpy()

        start = np.random.default_rng(seed).standard_normal(oracle.size)
        scale = np.linalg.norm(product(start)) / np.linalg.norm(start)
        matvec = LinearOperator((oracle.size, oracle.size), dtype=np.float64, matvec=product)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exited", category=UserWarning)  # distdl warns itself
            values, _, residuals = lobpcg(matvec, start[:, None], tol=tolerance * scale, largest=True,
                                          maxiter=max_products - _LOBPCG_EXTRA_PRODUCTS,
                                          retResidualNormsHistory=True)
        residual = float(np.ravel(residuals[-1])[0])
        return EigenEstimate(float(values[0]), residual, spent, bool(residual <= tolerance * scale))

    estimate = in_lockstep(oracle.hessian_vector_product, oracle.size, oracle.device, solve)
    if not estimate.converged:
        warnings.warn(f"the top Hessian eigenvalue did not converge in {estimate.products} Hessian-vector "
                      f"products: the best estimate {estimate.value:.6g} has residual {estimate.residual:.3g}; "
                      "raise study.hessian_products for a tighter one", stacklevel=2)
    return estimate  # type: ignore[return-value]


def hessian_trace(oracle: LossOracle, samples: int = 50, seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) and its standard error, from `samples` Rademacher vectors."""

    def solve(operator: Lockstep) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(seed)
        draws = []
        for _ in range(samples):
            v = torch.randint(0, 2, (oracle.size,), generator=generator, dtype=torch.float64) * 2 - 1
            draws.append(float(v @ operator(v).cpu()))
        values = np.array(draws)
        return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if samples > 1 else 0.0

    return in_lockstep(oracle.hessian_vector_product, oracle.size, oracle.device, solve)  # type: ignore[return-value]


def random_subspace(size: int, dimension: int, seed: int) -> Vector:
    """A size x dimension matrix of independent N(0, 1) entries (Keskar's A), stored in float32 to
    halve its memory: its entries are then exact float64 numbers, and every product with it is
    taken in float64 (`subspace_step`, `subspace_gradient`)."""
    if size * dimension * 4 > 4 * 2**30:
        raise ValueError(f"a random {dimension}-dimensional subspace of {size:,} parameters needs "
                         f"{size * dimension * 4 / 2**30:.1f} GiB; lower the subspace dimension")
    return torch.randn(size, dimension, generator=torch.Generator().manual_seed(seed))


# Rows of the subspace converted to float64 at a time: a bounded extra copy, whatever the model's size.
_SUBSPACE_ROWS = 1 << 16


def subspace_step(basis: Vector, y: Vector) -> Vector:
    """A y in float64."""
    return torch.cat([rows.double() @ y.double() for rows in basis.split(_SUBSPACE_ROWS)])


def subspace_gradient(basis: Vector, gradient: Vector) -> Vector:
    """A^T g in float64."""
    total = torch.zeros(basis.shape[1], dtype=torch.float64)
    for rows, part in zip(basis.split(_SUBSPACE_ROWS), gradient.double().split(_SUBSPACE_ROWS)):
        total += rows.double().T @ part
    return total


def subspace_coordinates(basis: Vector, x: Vector) -> Vector:
    """A^+ x in float64, by the normal equations: a tall Gaussian A is well conditioned (its Gram
    matrix's condition number is about ((1 + r) / (1 - r))^2 for r = sqrt(dimension / size))."""
    gram = torch.zeros(basis.shape[1], basis.shape[1], dtype=torch.float64)
    for rows in basis.split(_SUBSPACE_ROWS):
        rows = rows.double()
        gram += rows.T @ rows
    return torch.linalg.solve(gram, subspace_gradient(basis, x))


def epsilon_sharpness(oracle: LossOracle, epsilon: float, subspace: Optional[Vector] = None,
                      adaptive: bool = False, iterations: int = 10, seed: int = 0) -> float:
    """Keskar's Metric 2.1 at the current parameters x: 100 (max_y f(x + A y) - f(x)) / (1 + f(x)),
    the box on y as in the module docstring; the parameters are left as they were."""
    from scipy.optimize import minimize

    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon={epsilon} must lie in (0, 1)")
    center = oracle.parameters()
    if subspace is None:
        reference = center
    else:
        reference = subspace_coordinates(subspace, center.cpu())
    radius = (epsilon * reference.abs() if adaptive else epsilon * (reference.abs() + 1)).cpu()
    # The solver works in z = y / radius, in [-1, 1]: the same problem for every parameter scale, so
    # a rescaled network gives the solver the very same function.

    def loss_and_gradient_at(z: Vector) -> Vector:
        y = z.cpu() * radius
        step = y if subspace is None else subspace_step(subspace, y)
        oracle.set_parameters(center + step.to(center.device))
        return oracle.loss_and_gradient()

    def solve(operator: Lockstep) -> float:
        def negative(z: np.ndarray) -> tuple[float, np.ndarray]:
            out = operator(torch.from_numpy(z)).cpu()
            gradient = out[1:] if subspace is None else subspace_gradient(subspace, out[1:])
            return -float(out[0]), -(gradient * radius).numpy()

        value, gradient = negative(np.zeros(len(radius)))
        base = -value
        # Start at the corner that maximizes the linearized loss over the box (the sign of the
        # gradient): from the solution itself L-BFGS-B's first steps are unit-length, far inside a
        # box as wide as this one, and 10 iterations found a hundredth of that corner's rise on an
        # MLP. At an exact stationary point there is no gradient to follow: start at random.
        corner = np.sign(-gradient)
        start = corner if corner.any() else np.random.default_rng(seed).uniform(-1, 1, len(radius))
        if not corner.any():
            gradient = negative(start)[1]
        # L-BFGS-B sees the rise over its linearized size across the box, a number near 1: it takes
        # the objective's scale for its first step and stops when the objective's relative change is
        # below float64's resolution, which a loss of 1 rising by 1e-10 would be.
        scale = float(np.abs(gradient).sum()) or 1.0

        def rise(z: np.ndarray) -> tuple[float, np.ndarray]:
            negative_loss, negative_gradient = negative(z)
            return (negative_loss + base) / scale, negative_gradient / scale

        # Tolerances 0: exactly `iterations` iterations, as Keskar et al.
        result = minimize(rise, start, jac=True, method="L-BFGS-B", bounds=[(-1.0, 1.0)] * len(radius),
                          options={"maxiter": iterations, "ftol": 0.0, "gtol": 0.0})
        peak_rise = max(-float(result.fun) * scale, 0.0)  # the box holds y = 0: the rise is never negative
        return 100 * peak_rise / (1 + base)

    try:
        return float(in_lockstep(loss_and_gradient_at, len(radius), oracle.device, solve))
    finally:
        oracle.set_parameters(center)


def filter_normalized_direction(params: Sequence[torch.Tensor], seed: int) -> Vector:
    """A random direction in parameter space, normalized filter by filter as Li et al. 2018 define it
    for loss-landscape plots: each filter (a weight's slice along its first axis: a convolution's
    output channel, a linear layer's output unit) of a Gaussian direction is rescaled to that
    filter's norm in the weights. 1-D parameters (biases, normalization weights) get no component,
    as in Li et al.'s plots (their `ignore biasbn`). A rescaling of the network that leaves its
    function alone rescales the direction with it, so the landscape stays the same.

    Drawn in float64 on the CPU from `seed`: the same direction on every rank."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for param in params:
        direction = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        if param.dim() <= 1:
            direction.zero_()
        else:
            filters = direction.view(param.shape[0], -1)
            norms = param.detach().double().cpu().reshape(param.shape[0], -1).norm(dim=1, keepdim=True)
            filters.mul_(norms / filters.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny))
        parts.append(direction.reshape(-1))
    return torch.cat(parts)


def loss_landscape(oracle: LossOracle, directions: Sequence[Vector], coordinates: Sequence[float]) -> dict[str, Any]:
    """Loss and accuracy at the parameters x + a d1 (one direction) or x + a d1 + b d2 (two), for a and
    b in `coordinates` (Li et al. 2018); the parameters are left as they were. Every rank evaluates
    the same points, each on its own examples. Returns the coordinates and the values, indexed [a]
    or [a][b]."""
    if len(directions) not in (1, 2):
        raise ValueError(f"a loss landscape has 1 or 2 directions, not {len(directions)}")
    center = oracle.parameters()
    directions = [d.to(center.device) for d in directions]
    grid = [(a,) for a in coordinates] if len(directions) == 1 else [(a, b) for a in coordinates for b in coordinates]
    losses, accuracies = [], []
    try:
        for point in grid:
            oracle.set_parameters(center + sum(c * d for c, d in zip(point, directions)))
            result = oracle.evaluate()
            losses.append(result.loss)
            accuracies.append(result.accuracy)
    finally:
        oracle.set_parameters(center)
    shape = (len(coordinates),) * len(directions)
    return {"coordinates": [float(c) for c in coordinates], "loss": np.reshape(losses, shape).tolist(),
            "accuracy": np.reshape(accuracies, shape).tolist()}


def interpolation(model: torch.nn.Module, oracles: dict[str, LossOracle], start: dict[str, torch.Tensor],
                  end: dict[str, torch.Tensor], alphas: Sequence[float]) -> list[dict[str, float]]:
    """Loss and accuracy of `model` with the state (1 - alpha) start + alpha end for each alpha
    (Keskar's Figure 3), on each oracle's data (say the train and test sets; the oracles wrap
    `model`). Floating-point buffers (batch-norm statistics) are interpolated with the weights,
    running variances geometrically."""
    rows = []
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Copies: `start` is often the model's own state dict, which loading overwrites.
    start = {k: v.detach().clone() for k, v in start.items()}
    end = {k: v.detach().clone() for k, v in end.items()}
    try:
        for alpha in alphas:
            model.load_state_dict({k: _lerp(k, v, end[k], alpha) for k, v in start.items()})
            row = {"alpha": float(alpha)}
            for name, oracle in oracles.items():
                result = oracle.evaluate()
                row[f"{name}_loss"], row[f"{name}_accuracy"] = result.loss, result.accuracy
            rows.append(row)
    finally:
        model.load_state_dict(saved)
    return rows


def _lerp(name: str, start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    if not start.is_floating_point():
        return start
    if name.endswith("running_var"):
        # A scale: interpolated geometrically, so that past the two solutions (alpha < 0 or > 1) it
        # stays positive instead of crossing zero, where batch norm would divide by sqrt(eps).
        tiny = torch.finfo(start.dtype).tiny
        return torch.exp((1 - alpha) * start.clamp(min=tiny).log() + alpha * end.clamp(min=tiny).log())
    return (1 - alpha) * start + alpha * end
