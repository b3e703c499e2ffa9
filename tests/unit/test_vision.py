"""Vision without workers: model construction, datasets and their errors, sharding, the LR scaling rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from distdl.config import load_config
from distdl.data import vision
from distdl.errors import ConfigError
from distdl.models.resnet import CIFAR_RESNETS, MODEL_NAMES, TORCHVISION_RESNETS, build_resnet
from distdl.optim import effective_lr
from tests.helpers.shared import REPO

LAPTOP = REPO / "configs" / "resnet" / "mnist_laptop.yaml"


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels, classes", [(3, 10), (1, 100)])
def test_every_model_name_builds_with_the_right_output_shape(name, channels, classes):
    model = build_resnet(name, channels, classes).eval()
    size = 32 if name in CIFAR_RESNETS else 64
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


@pytest.mark.parametrize("name, millions", [("cifar_resnet20", 0.27), ("cifar_resnet56", 0.85),
                                            ("cifar_resnet110", 1.7), ("resnet50", 25.6)])
def test_parameter_counts_match_the_papers(name, millions):
    # He et al. 2016, table 6 (CIFAR) and torchvision's ResNet-50 (1000 classes).
    model = build_resnet(name, 3, 1000 if name == "resnet50" else 10)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.03)


def test_fully_connected_models_and_width_multipliers():
    from distdl.workloads.resnet import ResNetModelSection, build_classifier

    keskar = build_classifier(ResNetModelSection(name="mlp"), 1, 28, 10)
    # 784-512-512-512-10 with batch norm (linear layers without bias before it).
    assert sum(p.numel() for p in keskar.parameters()) == 784 * 512 + 2 * 512 * 512 + 512 * 10 + 10 + 3 * 2 * 512
    du = build_classifier(ResNetModelSection(name="two_layer_relu", width=4096), 1, 8, 10)
    assert [p.numel() for p in du.parameters() if p.requires_grad] == [4096 * 64], "only W trains"
    assert set(du.output.weight.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(32, 1, 8, 8) * 5
    narrow = build_classifier(ResNetModelSection(name="two_layer_relu", width=64), 1, 8, 10)
    with torch.no_grad():  # unit-norm inputs and 1/sqrt(m) output scaling: outputs O(1) at any width and input scale
        assert 0.3 < float(du(x).std()) < 3 and 0.3 < float(narrow(x).std()) < 3
        torch.testing.assert_close(du(x), du(x / 5))
    wide = build_classifier(ResNetModelSection(name="cifar_resnet20", width_multiplier=2), 3, 32, 10)
    base = build_classifier(ResNetModelSection(name="cifar_resnet20"), 3, 32, 10)
    ratio = sum(p.numel() for p in wide.parameters()) / sum(p.numel() for p in base.parameters())
    assert 3.9 < ratio < 4.0 and wide(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # convolutions grow as k^2


def test_mse_loss_is_the_squared_error_against_one_hot_targets():
    from distdl.workloads.resnet import LossSection, classification_loss

    logits, labels = torch.tensor([[0.5, 0.2], [1.0, -1.0]]), torch.tensor([0, 1])
    expected = ((0.5 - 1) ** 2 + 0.2**2 + 1.0**2 + (-1.0 - 1) ** 2) / 2
    assert float(classification_loss(logits, labels, LossSection(name="mse"))) == pytest.approx(expected)
    assert float(classification_loss(logits, labels, LossSection(name="mse"), "sum")) == pytest.approx(2 * expected)


def test_cifar_resnet_stages_halve_the_map_and_widen_16_32_64():
    model = build_resnet("cifar_resnet20", 3, 10)
    shapes = []
    model.layers.register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 64, 8, 8)] and len(model.layers) == 9  # three stages of n=3 blocks


# ----------------------------------------------------------------------------- datasets


def test_mnist_files_are_read_by_torchvision_without_download(mnist_root):
    data = vision.load_vision(vision.VisionDataSection(dataset="mnist", path=str(mnist_root), download=False))
    assert (len(data.train), len(data.eval), data.channels, data.classes) == (4000, 1000, 1, 10)
    image, label = data.train[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    # Normalized with MNIST's mean and std: a black pixel is (0 - 0.1307) / 0.3081, a white one (1 - 0.1307) / 0.3081.
    assert float(image.min()) == pytest.approx(-0.1307 / 0.3081, rel=1e-5)
    assert float(image.max()) == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-5)


@pytest.mark.parametrize("name, train, held_out, size", [("digits", 1437, 360, 8), ("mnist5k", 4000, 1000, 28)])
def test_packaged_digits_need_no_files_and_equal_torchvisions_reading_of_the_same_pixels(name, train, held_out, size,
                                                                                         mnist_root):
    data = vision.load_vision(vision.VisionDataSection(dataset=name))
    assert (len(data.train), len(data.eval), data.channels, data.classes, data.image_size) == (train, held_out, 1, 10, size)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert abs(float(images.mean())) < 0.01 and abs(float(images.std()) - 1) < 0.01  # the spec's mean and std
    assert sorted({data.eval[i][1] for i in range(len(data.eval))}) == list(range(10))
    if name == "mnist5k":  # the fixture wrote the same shuffled digits as torchvision's MNIST files
        mnist = vision.load_vision(vision.VisionDataSection(dataset="mnist", path=str(mnist_root)))
        assert torch.equal(mnist.train[7][0], data.train[7][0]) and mnist.eval[3][1] == data.eval[3][1]
    with pytest.raises(ConfigError, match=f"{size} pixels"):
        vision.load_vision(vision.VisionDataSection(dataset=name, image_size=size * 2))


def test_image_folder_reads_the_imagenet_layout(digits_folder):
    data = vision.load_vision(vision.VisionDataSection(dataset="imagefolder", path=str(digits_folder), image_size=32))
    assert data.classes == 10 and len(data.train) + len(data.eval) == 1797
    assert data.train[0][0].shape == (3, 32, 32) and data.eval[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_unreadable_image_is_named(digits_folder, tmp_path, damage):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(digits_folder, root)
    data = vision.load_vision(vision.VisionDataSection(dataset="imagefolder", path=str(root), image_size=32))
    index = 5
    path = Path(data.train.samples[index][0])
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"not a picture\n")
    data.train[index - 1]  # its neighbours still read
    with pytest.raises(vision.UnreadableImageError, match=f"image file {path} cannot be read"):
        data.train[index]


def test_cifar_training_images_are_augmented_and_eval_images_are_not():
    section = vision.VisionDataSection(dataset="cifar10")
    spec = vision.DATASETS["cifar10"]
    names = [type(t).__name__ for t in vision.transforms(section, spec, 32, train=True).transforms]
    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert [type(t).__name__ for t in vision.transforms(section, spec, 32, train=False).transforms] == [
        "ToTensor", "Normalize"]


@pytest.mark.parametrize("size, world", [(4000, 2), (1000, 3), (7, 4)])
def test_rank_blocks_cover_every_image_once(size, world):
    blocks = [vision.rank_indices(size, rank, world) for rank in range(world)]
    assert [i for block in blocks for i in block] == list(range(size))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_train_batches_resume_where_they_left_off(mnist_root):
    from distdl.data.shards import BatchPlan

    data = vision.load_vision(vision.VisionDataSection(dataset="mnist", path=str(mnist_root)))
    plan = BatchPlan(micro_batch_size=64, accumulation_steps=1, world_size=2, rank=1, seed=3)
    first = [b["labels"] for _, b in zip(range(40), vision.train_batches(data.train, plan, 0, 0))]
    resumed = [b["labels"] for _, b in zip(range(10), vision.train_batches(data.train, plan, 30, 0))]
    assert all(torch.equal(a, b) for a, b in zip(first[30:], resumed))
    assert not torch.equal(first[0], first[31]), "epoch 2 (31 global batches of 128 in 4000 images) is reshuffled"


# ----------------------------------------------------------------------------- bad input


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(LAPTOP, list(overrides))
    return str(info.value)


def prepare_error(*overrides: str) -> str:
    from distdl.workloads.resnet import ResNetClassification

    with pytest.raises(ConfigError) as info:
        ResNetClassification.prepare(load_config(LAPTOP, list(overrides)))
    return str(info.value)


def test_unknown_model_and_dataset_names_list_the_known_ones():
    message = config_error("model.name=resnet9000")
    assert "resnet9000" in message and all(name in message for name in (*TORCHVISION_RESNETS, *CIFAR_RESNETS, "mlp"))
    message = config_error("data.dataset=svhn")
    assert "svhn" in message and all(name in message for name in vision.DATASETS)


def test_a_path_without_the_files_names_what_it_expects(tmp_path):
    message = prepare_error(f"data.path={tmp_path}", "data.download=false")
    assert str(tmp_path) in message and "MNIST/raw/train-images-idx3-ubyte" in message


def test_a_failed_download_says_so(tmp_path, monkeypatch):
    import torchvision.datasets

    # A closed local port stands in for a machine without network, wherever the test runs.
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    message = prepare_error(f"data.path={tmp_path}", "data.dataset=fashion_mnist")
    assert "downloading it failed" in message and "FashionMNIST/raw" in message


def test_image_folder_without_val_and_with_other_classes(digits_folder, tmp_path):
    shutil.copytree(digits_folder / "train", tmp_path / "train")
    message = prepare_error("data.dataset=imagefolder", f"data.path={tmp_path}")
    assert f"{tmp_path}/val is missing" in message and "ImageNet layout" in message
    shutil.copytree(digits_folder / "val", tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "7")
    assert "different classes" in prepare_error("data.dataset=imagefolder", f"data.path={tmp_path}")


def test_an_image_size_the_dataset_does_not_have_is_refused(mnist_root):
    message = prepare_error(f"data.path={mnist_root}", "data.image_size=32")
    assert "(1, 28, 28)" in message and "(1, 32, 32)" in message


@pytest.mark.parametrize("override, expected", [
    ("model.width=0", "model.width=0 must be at least 1"),
    ("model.width_multiplier=0", "model.width_multiplier=0 must be at least 1"),
    ("model.hidden_sizes=[512,0]", "model.hidden_sizes[1]=0 must be at least 1"),
    ("loss.name=hinge", "cross_entropy, mse"),
])
def test_model_sizes_and_loss_names_are_checked(override, expected):
    assert expected in config_error(override)


def test_sync_batchnorm_needs_gpus():
    assert "GPU" in config_error("model.sync_batchnorm=true")


# ----------------------------------------------------------------------------- the large-batch recipe


def test_linear_scaling_rule():
    config = load_config(REPO / "configs/resnet/imagenet_resnet50.yaml", ["trainer.global_batch_size=8192",
                                                                          "scaling.num_workers=256"])
    assert effective_lr(config.optimizer, config.trainer.global_batch_size) == pytest.approx(3.2)  # 0.1 x 8k / 256
    laptop = load_config(LAPTOP)
    assert effective_lr(laptop.optimizer, 128) == 0.1  # no reference batch: lr as given


@pytest.mark.parametrize("override, expected", [
    ("loss.label_smoothing=1.5", "loss.label_smoothing=1.5"),
    ("data.image_size=4", "data.image_size=4"),
    ("data.loader_workers=-1", "data.loader_workers=-1"),
    ("optimizer.reference_batch_size=0", "optimizer.reference_batch_size=0"),
    ("optimizer.nesterov=true", "optimizer.name=sgd only"),
])
def test_bad_vision_and_recipe_values_name_the_key(override, expected):
    overrides = [override] + (["optimizer.name=adamw"] if "nesterov" in override else [])
    assert expected in config_error(*overrides)


def test_export_names_the_kept_checkpoints_when_asked_for_another(tmp_path):
    from distdl.engine.checkpoints import find_checkpoint

    (tmp_path / "checkpoint_00000010").mkdir()
    with pytest.raises(ConfigError, match=r"'checkpoint_9'.*kept: checkpoint_00000010"):
        find_checkpoint(tmp_path, "checkpoint_9")
    with pytest.raises(ConfigError, match="no scored checkpoint"):
        find_checkpoint(tmp_path, "best")


@pytest.mark.parametrize("architecture, channels, options", [
    ("cifar_resnet20", 3, {"width_multiplier": 2}), ("mlp", 1, {"hidden_sizes": [32, 16], "batch_norm": True}),
    ("two_layer_relu", 1, {"width": 64}), ("resnet18", 1, {}), ("resnet18", 3, {})])
def test_every_classifier_exports_and_loads_back_the_same_model(tmp_path, architecture, channels, options):
    from distdl.models import classifiers

    torch.manual_seed(0)
    model = classifiers.build_classifier(architecture, channels, 16, 10, **options).eval()
    spec = classifiers.export_spec(architecture, {"width_multiplier": 1, "hidden_sizes": [512], "batch_norm": False,
                                                  "width": 1024, "train_output_layer": False, **options},
                                   channels, 16, [f"class {i}" for i in range(10)], (0.5,) * channels,
                                   (0.25,) * channels, None)
    classifiers.write_exported(tmp_path, spec, model.state_dict())
    loaded = classifiers.load_exported(tmp_path)
    images = torch.randn(4, channels, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # torchvision's own constructor takes a 3-channel ResNet's weights as they are.
    assert spec["torchvision"] == ("resnet18" if architecture == "resnet18" and channels == 3 else None)


def test_weights_that_do_not_fit_the_architecture_are_refused_naming_it(tmp_path):
    from distdl.models import classifiers

    spec = classifiers.export_spec("cifar_resnet20", {"width_multiplier": 1}, 3, 32, ["a", "b"], (0.5,) * 3,
                                   (0.5,) * 3, None)
    other = classifiers.build_classifier("cifar_resnet32", 3, 32, 2).state_dict()
    with pytest.raises(ConfigError, match="does not match cifar_resnet20"):
        classifiers.write_exported(tmp_path, spec, other)
    assert not list(tmp_path.iterdir())


def test_the_measured_loss_keeps_float64_and_training_losses_are_fp32(tmp_path):
    """The studies measure in float64 (rises far below float32's resolution); training under bf16
    computes its loss in fp32 from bf16 logits."""
    from distdl.workloads.base import WorkerContext
    from distdl.workloads.resnet import ResNetClassification

    config = load_config(LAPTOP, ["data.dataset=digits", "data.path=null", "model.name=mlp"])
    context = WorkerContext(rank=0, world_size=1, seed=0, micro_batch_size=8, run_dir=tmp_path,
                            device=torch.device("cpu"))
    workload = ResNetClassification(config.sections, context)
    model = workload.build_model()
    images, labels = workload.measurement_batches("eval", limit=16)[0]
    loss, correct = workload.loss_sum(model.double(), (images.double(), labels))
    assert loss.dtype == torch.float64
    loss, _ = workload.loss(model.bfloat16(), {"images": images.bfloat16(), "labels": labels})
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_checkpointed_resnet_blocks_keep_loss_gradients_and_batch_norm_statistics(name):
    """Each block runs again in the backward pass, and batch norm folds each batch in only once."""
    from distdl.models.activation_checkpointing import checkpoint_residual_stages

    torch.manual_seed(0)
    plain = build_resnet(name, 3, 10)
    checkpointed = build_resnet(name, 3, 10)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_residual_stages(checkpointed)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys(), "exports and checkpoints are unchanged"
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    runs = []
    for model in (plain, checkpointed):
        convs = []
        first_block = next(m for m in model.modules() if m.__class__.__name__ in ("BasicBlock", "Bottleneck"))
        first_block.conv1.register_forward_hook(lambda *_: convs.append(1))
        model.train()
        for _ in range(2):  # two steps' worth of running statistics
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
        runs.append((len(convs), loss.detach(), model.state_dict(), [p.grad.clone() for p in model.parameters()]))
    (plain_calls, plain_loss, plain_state, plain_grads), (calls, loss, state, grads) = runs
    assert (plain_calls, calls) == (2, 4), "the block's convolution runs again in each backward pass"
    assert torch.equal(loss, plain_loss)
    for key in plain_state:  # running means, variances and batch counts included
        assert torch.equal(state[key], plain_state[key]), key
    for got, expected in zip(grads, plain_grads):
        assert torch.equal(got, expected)


def test_activation_checkpointing_of_a_model_without_residual_blocks_is_refused():
    message = config_error("model.name=mlp", "model.activation_checkpointing=true")
    assert "model.activation_checkpointing=true applies to ResNets" in message and "model.name=mlp" in message
