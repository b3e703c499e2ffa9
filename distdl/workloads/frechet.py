"""Frechet distances between image sets, through torch-fidelity (the reference FID implementation
that torchmetrics also builds on): its statistics, its distance, and its port of the TensorFlow
InceptionV3 that FID numbers in papers come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from distdl.engine.safe_loading import load_tensors, tensors_only
from distdl.errors import ConfigError

Statistics = dict[str, np.ndarray]


def feature_statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance of features (one row per image), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least two feature rows, got an array of shape {features.shape}")
    return fid_features_to_statistics(torch.from_numpy(features))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017)."""
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def load_inception(path: Path, key: str = "eval.inception_weights") -> torch.nn.Module:
    """The FID InceptionV3 from a local weights file, loaded without running pickled code: torch-fidelity's
    own torch.load of it runs inside `tensors_only`, so the bytes it loads are the bytes checked."""
    hint = f"download {URL_INCEPTION_V3} once where there is network and point {key} at it"
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file; {hint}")
    try:
        state = load_tensors(path)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is not usable
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        raise ConfigError(f"{key}: {path} is not a PyTorch weights file that loads safely "
                          f"(torch.load weights_only=True): {reason[:200]}; {hint}") from error
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {path} holds a {type(state).__name__}, not a state dict; {hint}")
    try:
        with tensors_only(path):
            return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as error:
        raise ConfigError(f"{key}: {path} is not the FID InceptionV3 (torch-fidelity's "
                          f"weights-inception-2015-12-05): {_mismatch(error)}; {hint}") from error


def _mismatch(error: RuntimeError) -> str:
    """The first missing/unexpected/size-mismatch line of load_state_dict's report, shortened."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
    return lines[0] if len(lines[0]) <= 200 else lines[0][:200] + " ..."


def inception_features(inception: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """2048-d pool features of images in [-1, 1], quantized to 8 bits as FID expects (the network
    resizes to 299x299 itself, the way TensorFlow did); grayscale is repeated to three channels."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    (features,) = inception(pixels)
    return features.cpu().numpy()
