"""Minibatch-shaped gradient noise against its definition: a large batch plus the noise has the
gradient covariance of a small batch, on a problem whose per-example gradients are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distdl.optim import minibatch_noise_scale, minibatch_noise_weights

GLOBAL, MICRO, SMALL, DRAWS = 32, 8, 4, 6000


def _per_example_gradients() -> torch.Tensor:
    """Least squares' per-example gradients 2 x_i (x_i . w - y_i) at a fixed w, over 64 examples."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    y = torch.randn(64, generator=generator, dtype=torch.float64)
    w = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    return 2 * x * (x @ w - y)[:, None]


def _covariance(samples: torch.Tensor) -> np.ndarray:
    return np.cov(samples.numpy(), rowvar=False)


def test_a_large_batch_plus_minibatch_noise_has_the_small_batchs_gradient_covariance():
    gradients = _per_example_gradients()
    sigma = np.cov(gradients.numpy(), rowvar=False, bias=True)  # the population's, over the 64 examples
    scale = minibatch_noise_scale(GLOBAL, MICRO, SMALL)
    generator = torch.Generator().manual_seed(1)
    noisy, plain = [], []
    for _ in range(DRAWS):
        # A global batch drawn with replacement, cut into micro-batches, each weighted as the loop weights
        # its per-example losses; the gradient of a weighted sum of losses is the weighted sum of gradients.
        batch = gradients[torch.randint(0, len(gradients), (GLOBAL,), generator=generator)].view(-1, MICRO, 3)
        weights = torch.stack([minibatch_noise_weights(MICRO, scale, generator) for _ in batch]).double()
        noisy.append((weights[:, :, None] * batch).sum(1).mean(0))
        plain.append(batch.mean((0, 1)))
    noisy_cov, plain_cov = _covariance(torch.stack(noisy)), _covariance(torch.stack(plain))
    # 6,000 draws: each covariance entry's Monte Carlo error is about 2%.
    assert np.linalg.norm(noisy_cov - sigma / SMALL) < 0.08 * np.linalg.norm(sigma / SMALL)
    assert np.linalg.norm(plain_cov - sigma / GLOBAL) < 0.08 * np.linalg.norm(sigma / GLOBAL)
    # The noise has mean zero: the mean gradient is the plain one's.
    assert torch.stack(noisy).mean(0).numpy() == pytest.approx(gradients.mean(0).numpy(), abs=0.05)


def test_the_weights_keep_the_mean_loss_and_vanish_without_a_scale():
    generator = torch.Generator().manual_seed(0)
    weights = minibatch_noise_weights(MICRO, 0.7, generator)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6), "the noise adds nothing to the mean"
    assert torch.equal(minibatch_noise_weights(MICRO, 0.0, generator), torch.full((MICRO,), 1 / MICRO))
    with pytest.raises(ValueError, match="below the global batch"):
        minibatch_noise_scale(32, 8, 32)
    with pytest.raises(ValueError, match="micro-batches of 2 or more"):
        minibatch_noise_scale(32, 1, 4)
