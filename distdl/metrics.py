"""Measurements on models' outputs that more than one workload or study uses."""

from __future__ import annotations

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features (one row per image), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least two feature rows, got an array of shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Frechet distance between two Gaussians (Dowson and Landau 1982), as FID uses it
    (Heusel et al. 2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    from scipy import linalg

    product = cov_a @ cov_b
    root = linalg.sqrtm(product)
    if not np.isfinite(root).all():
        # Near-singular covariances (fewer images than features): nudge both, as pytorch-fid does.
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real  # sqrtm of a product of PSD matrices has a negligible imaginary part from round-off
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
