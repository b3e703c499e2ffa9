"""The studies' measurements against exact answers, in one process and data-parallel over 2 gloo processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from distdl.noise_scale import noise_scale_terms
from distdl.studies.measures import (
    LossOracle,
    SolverFailed,
    epsilon_sharpness,
    filter_normalized_direction,
    hessian_top_eigenvalue,
    hessian_trace,
    in_lockstep,
    interpolation,
    loss_landscape,
    random_subspace,
)


def squared_error(model: nn.Module, batch):
    inputs, targets = batch
    return 0.5 * ((model(inputs).squeeze(-1) - targets) ** 2).sum(), torch.zeros(())


def regression(inputs: torch.Tensor, solution: torch.Tensor, batch: int = 16) -> LossOracle:
    """Least squares on `inputs` with targets from `solution`: the Hessian is X^T X / N exactly, and the
    model sits at the minimum (loss 0)."""
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Linear(inputs.shape[1], 1, bias=False)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        model.weight.copy_(solution)
    solution = solution.double()
    targets = inputs @ solution.reshape(-1)
    batches = [(inputs[i : i + batch], targets[i : i + batch]) for i in range(0, len(inputs), batch)]
    return LossOracle(model, batches, squared_error, torch.device("cpu"))


def diagonal_design(curvatures: np.ndarray, copies: int = 4) -> torch.Tensor:
    """Rows whose X^T X / N is diag(curvatures)."""
    n = len(curvatures)
    rows = np.concatenate([np.diag(np.sqrt(curvatures * n))] * copies)
    return torch.from_numpy(rows)


def test_top_eigenvalue_and_trace_of_a_quadratic_equal_its_hessians():
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.normal(size=(200, 12)) @ np.diag(np.linspace(0.2, 3.0, 12)))
    oracle = regression(inputs, torch.from_numpy(rng.normal(size=(1, 12))))
    hessian = (inputs.T @ inputs / len(inputs)).numpy()
    assert hessian_top_eigenvalue(oracle, tolerance=1e-8).value == pytest.approx(np.linalg.eigvalsh(hessian)[-1], rel=1e-6)
    trace, error = hessian_trace(oracle, samples=400)
    assert abs(trace - np.trace(hessian)) < 4 * error and error < 0.1 * np.trace(hessian)


def test_the_eigenvalue_budget_counts_hessian_vector_products_and_keeps_the_best_estimate():
    curvatures = np.concatenate([[10.0, 9.9, 9.8], np.linspace(0.1, 9.0, 197)])  # a small gap: slow
    oracle = regression(diagonal_design(curvatures, copies=1), torch.zeros(1, 200, dtype=torch.float64))
    calls = 0
    product = oracle.hessian_vector_product

    def counted(vector):
        nonlocal calls
        calls += 1
        return product(vector)

    oracle.hessian_vector_product = counted
    for budget in (5, 12, 40):
        calls = 0
        with pytest.warns(UserWarning, match=rf"did not converge in {budget} Hessian-vector products.*residual"):
            estimate = hessian_top_eigenvalue(oracle, tolerance=1e-14, max_products=budget)
        assert calls == estimate.products == budget and not estimate.converged
        # A Rayleigh quotient: at most the top eigenvalue, and within its residual of some eigenvalue.
        assert estimate.value <= 10.0 + 1e-12
        assert np.abs(curvatures - estimate.value).min() <= estimate.residual
    calls = 0
    converged = hessian_top_eigenvalue(oracle, tolerance=1e-6, max_products=1000)
    assert converged.converged and calls == converged.products < 1000
    assert converged.value == pytest.approx(10.0, rel=1e-9)
    with pytest.raises(ValueError, match="at least 5"):
        hessian_top_eigenvalue(oracle, max_products=4)


def offset_regression(curvatures: np.ndarray, solution: np.ndarray, dtype: torch.dtype) -> LossOracle:
    """f(x) = 1 + 0.5 sum h_i (x_i - solution_i)^2: the loss at the minimum is 1."""
    inputs = diagonal_design(curvatures).to(dtype)
    model = nn.Linear(len(curvatures), 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(solution)[None])
    targets = inputs @ torch.from_numpy(solution).to(dtype)

    def loss_sum(net, batch):
        x, y = batch
        return 0.5 * ((net(x).squeeze(-1) - y) ** 2).sum() + len(y), torch.zeros(())

    return LossOracle(model, [(inputs, targets)], loss_sum, torch.device("cpu"))


def test_a_rise_below_float32s_resolution_is_still_measured():
    # Rises of about 1e-10 over a loss of 1: float32 (resolution 6e-8 at 1) cannot see them.
    curvatures, solution = np.array([0.5, 1.0, 2.0, 8.0]), np.array([0.0, -1.0, 2.0, 0.5])
    eps = 2e-6
    expected = 100 * 0.5 * (curvatures * (eps * (np.abs(solution) + 1)) ** 2).sum() / (1 + 1)
    assert expected < 1e-7
    assert epsilon_sharpness(offset_regression(curvatures, solution, torch.float64), eps) == pytest.approx(
        expected, rel=1e-5)
    assert epsilon_sharpness(offset_regression(curvatures, solution, torch.float32), eps) != pytest.approx(
        expected, rel=1e-2), "a float32 loss would not see it (else this test shows nothing)"
    # In a random subspace too: around x = 0 the box is |z| <= eps, the rise largest at a corner.
    oracle = offset_regression(curvatures, np.zeros(4), torch.float64)
    basis = random_subspace(4, 2, seed=3)
    a = basis.double().numpy()
    corners = [np.array([s, t]) * eps for s in (-1, 1) for t in (-1, 1)]
    peak = max(0.5 * (a @ z) @ np.diag(curvatures) @ (a @ z) for z in corners)
    assert epsilon_sharpness(oracle, eps, subspace=basis) == pytest.approx(100 * peak / 2, rel=1e-5)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    curvatures = np.array([0.5, 1.0, 2.0, 8.0])
    oracle = regression(diagonal_design(curvatures), torch.ones(1, 4))
    trace, error = hessian_trace(oracle, samples=5)
    assert trace == pytest.approx(curvatures.sum()) and error == pytest.approx(0, abs=1e-12)


def test_epsilon_sharpness_of_a_quadratic_at_its_minimum_is_its_value_at_the_boxs_corner():
    # f(x + y) = 0.5 sum h_i y_i^2 is largest at the corner |y_i| = eps (|x_i| + 1); f(x) = 0.
    curvatures, solution = np.array([0.5, 1.0, 2.0, 8.0]), np.array([0.0, -1.0, 2.0, 0.5])
    oracle = regression(diagonal_design(curvatures), torch.from_numpy(solution)[None])
    for eps in (1e-3, 5e-4):
        expected = 100 * 0.5 * (curvatures * (eps * (np.abs(solution) + 1)) ** 2).sum()
        assert epsilon_sharpness(oracle, eps) == pytest.approx(expected, rel=1e-6)
        adaptive = 100 * 0.5 * (curvatures * (eps * np.abs(solution)) ** 2).sum()
        assert epsilon_sharpness(oracle, eps, adaptive=True) == pytest.approx(adaptive, rel=1e-6)
    assert torch.equal(oracle.parameters(), torch.from_numpy(solution)), "the solution is put back"


def test_epsilon_sharpness_away_from_the_minimum_reaches_the_corner_the_gradient_points_to():
    # f(x + y) = 0.5 sum h_i (x_i + y_i - c_i)^2 with x != c: each term is largest at y_i = r_i sign(x_i - c_i).
    curvatures, minimum = np.array([0.5, 1.0, 2.0, 8.0]), np.array([1.0, 0.0, -2.0, 0.5])
    at = np.array([1.2, -0.3, -2.0005, 0.6])
    oracle = regression(diagonal_design(curvatures), torch.from_numpy(minimum)[None])
    oracle.set_parameters(torch.from_numpy(at))
    radius = 1e-3 * (np.abs(at) + 1)
    base = 0.5 * (curvatures * (at - minimum) ** 2).sum()
    peak = 0.5 * (curvatures * (np.abs(at - minimum) + radius) ** 2).sum()
    assert oracle.evaluate().loss == pytest.approx(base)
    assert epsilon_sharpness(oracle, 1e-3) == pytest.approx(100 * (peak - base) / (1 + base), rel=1e-6)


def test_subspace_sharpness_bounds_and_box():
    curvatures = np.array([0.5, 1.0, 2.0, 8.0, 3.0, 1.0])
    oracle = regression(diagonal_design(curvatures), torch.zeros(1, 6, dtype=torch.float64))
    basis = random_subspace(6, 2, seed=1)
    sharpness = epsilon_sharpness(oracle, 1e-3, subspace=basis)
    # With x = 0 the box is |z_i| <= eps: the maximum of the convex quadratic is at one of its 4 corners.
    hessian = np.diag(curvatures)
    a = basis.double().numpy()
    corners = [np.array([s, t]) * 1e-3 for s in (-1, 1) for t in (-1, 1)]
    assert sharpness == pytest.approx(100 * max(0.5 * (a @ z) @ hessian @ (a @ z) for z in corners), rel=1e-5)


def relu_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def cross_entropy(model: nn.Module, batch):
    inputs, labels = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


def classification_batches(seed: int = 0, count: int = 64):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, 5, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, count, 16)]


def test_adaptive_sharpness_ignores_a_relu_rescaling_that_changes_keskars():
    batches = classification_batches()
    model = relu_net()
    before = LossOracle(model, batches, cross_entropy, torch.device("cpu"))
    raw, adaptive = epsilon_sharpness(before, 1e-2), epsilon_sharpness(before, 1e-2, adaptive=True)
    assert raw > 0 and adaptive > 0
    with torch.no_grad():  # Dinh et al.: scale a layer's input weights by 10 and its output weights by 1/10
        model[0].weight *= 10
        model[0].bias *= 10
        model[2].weight /= 10
    after = LossOracle(model, batches, cross_entropy, torch.device("cpu"))
    assert after.evaluate().loss == pytest.approx(before.evaluate().loss, rel=1e-5)
    assert epsilon_sharpness(after, 1e-2, adaptive=True) == pytest.approx(adaptive, rel=1e-3)
    assert abs(epsilon_sharpness(after, 1e-2) - raw) > 0.1 * raw


def test_filter_normalized_landscapes_of_a_relu_net_and_its_rescaled_twin_are_the_same():
    """Li et al.'s reason for filter normalization: Dinh et al.'s rescaling leaves the function, and
    so the landscape, unchanged; plain Gaussian directions see a different one."""
    batches = [(x.double(), y) for x, y in classification_batches()]
    net, twin = relu_net().double(), relu_net().double()
    with torch.no_grad():  # the first layer's units scaled by 10, the next layer's inputs by 1/10
        twin[0].weight *= 10
        twin[0].bias *= 10
        twin[2].weight /= 10
    coordinates = np.linspace(-1, 1, 5)
    surfaces, plain = {}, {}
    for name, model in (("net", net), ("twin", twin)):
        oracle = LossOracle(model, batches, cross_entropy, torch.device("cpu"))
        directions = [filter_normalized_direction(oracle.params, seed) for seed in (0, 1)]
        surfaces[name] = loss_landscape(oracle, directions, coordinates)
        plain[name] = loss_landscape(oracle, [torch.randn(oracle.size, generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.float64)], coordinates)
        center = len(coordinates) // 2
        assert surfaces[name]["loss"][center][center] == pytest.approx(oracle.evaluate().loss, rel=1e-12)
        assert torch.equal(oracle.parameters(), LossOracle(model, batches, cross_entropy,
                                                           torch.device("cpu")).parameters()), "put back"
    np.testing.assert_allclose(surfaces["twin"]["loss"], surfaces["net"]["loss"], rtol=1e-10)
    assert np.ptp(surfaces["net"]["loss"]) > 0.1, "the landscape is not flat"
    assert not np.allclose(plain["twin"]["loss"], plain["net"]["loss"], rtol=1e-2)
    # Filter by filter: each output unit's slice of the direction has that unit's norm; biases none.
    direction = filter_normalized_direction(list(net.parameters()), 0)
    first = direction[: net[0].weight.numel()].view_as(net[0].weight)
    torch.testing.assert_close(first.norm(dim=1), net[0].weight.detach().norm(dim=1))
    bias = direction[net[0].weight.numel() : net[0].weight.numel() + net[0].bias.numel()]
    assert not bias.any()


def test_interpolation_passes_through_both_solutions_and_lerps_batch_norm_statistics():
    batches = classification_batches()
    first, second = (nn.Sequential(relu_net(seed), nn.BatchNorm1d(3)).eval() for seed in (0, 1))
    with torch.no_grad():
        second[1].running_mean.fill_(2.0)
    oracle = LossOracle(first, batches, cross_entropy, torch.device("cpu"))
    start = {k: v.clone() for k, v in first.state_dict().items()}
    end = second.state_dict()
    seen = []
    first[1].register_forward_hook(lambda module, args, out: seen.append(float(module.running_mean[0])))
    first_loss = oracle.evaluate().loss
    # The model's own state dict as the start, as the study passes it: loading must not change it midway.
    rows = interpolation(first, {"train": oracle}, first.state_dict(), end, [0.5, 0.0, 1.0])
    seen = seen[len(batches):]  # the evaluation above
    assert rows[1]["train_loss"] == pytest.approx(first_loss), "alpha 0 after alpha 0.5 is still the start"
    second_loss = LossOracle(second, batches, cross_entropy, torch.device("cpu")).evaluate().loss
    assert rows[2]["train_loss"] == pytest.approx(second_loss, rel=1e-6)
    assert seen[0] == pytest.approx(1.0), "halfway, the running mean is halfway from 0 to 2"
    assert all(torch.equal(v, start[k]) for k, v in first.state_dict().items()), "the model is put back"


def test_noise_scale_terms_recover_a_known_covariance():
    rng = np.random.default_rng(0)
    dimension, small, large = 20, 8, 64
    mean = rng.normal(size=dimension) * 0.3
    scales = np.linspace(0.5, 2.0, dimension)  # Sigma = diag(scales^2)
    estimates = []
    for _ in range(3000):
        per_example = mean + rng.normal(size=(large, dimension)) * scales
        small_norms = [np.sum(per_example[i : i + small].mean(0) ** 2) for i in range(0, large, small)]
        estimates.append(noise_scale_terms(float(np.mean(small_norms)), float(np.sum(per_example.mean(0) ** 2)),
                                           small, large))
    gradient_sq, trace = np.mean(estimates, axis=0)
    assert gradient_sq == pytest.approx(np.sum(mean**2), rel=0.05)
    assert trace == pytest.approx(np.sum(scales**2), rel=0.02)
    with pytest.raises(ValueError, match="small batch"):
        noise_scale_terms(1.0, 1.0, 64, 64)


def test_a_runs_noise_scale_is_the_ratio_of_mean_terms_over_the_second_half(tmp_path):
    from distdl.noise_scale import noise_scale_of_run, with_noise_scale
    from distdl.rundir import METRICS_FILE

    windows = [{"step": 10 * i, **with_noise_scale({"noise_gradient_sq": g, "noise_trace": t})}
               for i, (g, t) in enumerate([(9.0, 1.0), (9.0, 1.0), (1.0, 4.0), (3.0, 8.0)], start=1)]
    assert [w["noise_scale"] for w in windows] == [1 / 9, 1 / 9, 4.0, 8 / 3]
    lines = [windows[0], {"step": 15, "eval_loss": 0.5}, *windows[1:]]  # an evaluation line has no terms
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    # The last two windows: mean trace 6 over mean |G|^2 2, not the mean of the ratios (3.33).
    assert noise_scale_of_run(tmp_path) == 3.0
    assert noise_scale_of_run(tmp_path / "elsewhere") is None


def test_epsilon_outside_0_1_is_refused():
    oracle = LossOracle(relu_net(), classification_batches(), cross_entropy, torch.device("cpu"))
    for eps in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
            epsilon_sharpness(oracle, eps)


# ----------------------------------------------------------------------------- data-parallel

def _measure(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batches = classification_batches()
        # Uneven shards: rank 0 gets 3 batches, rank 1 one.
        mine = batches[:3] if rank == 0 else batches[3:]
        oracle = LossOracle(relu_net(), mine if world > 1 else batches, cross_entropy, torch.device("cpu"))
        results = {
            "loss": oracle.evaluate().loss,
            "eigenvalue": hessian_top_eigenvalue(oracle, tolerance=1e-6).value,
            # Out of products before converging: every rank still gets rank 0's best estimate.
            "eigenvalue_unconverged": hessian_top_eigenvalue(oracle, tolerance=1e-14, max_products=6).value,
            "trace": hessian_trace(oracle, samples=10)[0],
            "sharpness": epsilon_sharpness(oracle, 1e-2),
            "subspace": epsilon_sharpness(oracle, 1e-2, subspace=random_subspace(oracle.size, 5, 0)),
            "landscape": loss_landscape(oracle, [filter_normalized_direction(oracle.params, s) for s in (0, 1)],
                                        [-0.5, 0.0, 0.5])["loss"],
        }
        try:  # a solver failing on rank 0 fails every rank, rather than leaving the others waiting
            in_lockstep(oracle.hessian_vector_product, oracle.size, oracle.device, _failing_solver)
        except (ZeroDivisionError, SolverFailed) as error:
            results["failure"] = type(error).__name__
        out[rank] = results
    finally:
        dist.destroy_process_group()


def _failing_solver(operator) -> None:
    operator(torch.ones(operator.size, dtype=torch.float64))
    raise ZeroDivisionError("the solver's own failure")


def test_measurements_on_two_gloo_ranks_equal_one_process():
    from tests.helpers.gloo import spawn_gloo

    single, parallel = spawn_gloo(_measure, 1)[0], spawn_gloo(_measure, 2)
    assert parallel[0].pop("failure") == "ZeroDivisionError" and parallel[1].pop("failure") == "SolverFailed"
    assert parallel[0] == parallel[1], "every rank gets rank 0's answers"
    single.pop("failure")
    np.testing.assert_allclose(parallel[0].pop("landscape"), single.pop("landscape"), rtol=1e-6)
    for name, value in single.items():
        assert parallel[0][name] == pytest.approx(value, rel=1e-4, abs=1e-9), name


def test_interpolating_past_the_solutions_keeps_batch_norm_variances_positive():
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).eval()
    oracle = LossOracle(model, classification_batches(), cross_entropy, torch.device("cpu"))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v.clone() for k, v in start.items()}
    end["1.running_var"] = torch.full((3,), 4.0)  # at alpha = -1: 2 x 1 - 4 < 0
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(module.running_var.clone()))
    rows = interpolation(model, {"train": oracle}, start, end, [-1.0, 0.5, 2.0])
    assert all(np.isfinite(row["train_loss"]) for row in rows)
    per_alpha = seen[:: len(classification_batches())]
    # Geometric: 1^2 / 4 = 0.25 at alpha -1, sqrt(1 x 4) = 2 halfway, 4^2 = 16 at alpha 2.
    assert [float(v[0]) for v in per_alpha] == pytest.approx([0.25, 2.0, 16.0])
