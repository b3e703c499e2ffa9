"""Image classifiers by name (ResNets and the studies' fully connected networks), and the folder
`distdl export` writes for them: `model.safetensors` plus `model.json`.

`model.json` holds the architecture and the arguments that build it, the class names, and the input
the model expects (channels, crop size, normalization). A torchvision ResNet on 3-channel images
loads into torchvision's own constructor with `strict=True`:

    model = torchvision.models.resnet50(num_classes=spec["num_classes"])
    model.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))

Every exported classifier (torchvision, CIFAR ResNets, MLPs) loads with `load_exported(folder)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distdl.errors import ConfigError
from distdl.models.mlp import MLP, TwoLayerReLU
from distdl.models.resnet import CIFAR_RESNETS, TORCHVISION_RESNETS, build_resnet
from distdl.models.resnet import MODEL_NAMES as RESNET_NAMES

FULLY_CONNECTED = ("mlp", "two_layer_relu")
CLASSIFIER_NAMES = (*RESNET_NAMES, *FULLY_CONNECTED)
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
# The options each architecture takes, beyond channels, image size and classes.
OPTIONS = {**{name: ("width_multiplier",) for name in CIFAR_RESNETS},
           **{name: () for name in TORCHVISION_RESNETS},
           "mlp": ("hidden_sizes", "batch_norm"), "two_layer_relu": ("width", "train_output_layer")}


def build_classifier(architecture: str, in_channels: int, image_size: int, num_classes: int,
                     zero_init_residual: bool = False, width_multiplier: int = 1,
                     hidden_sizes: tuple[int, ...] | list[int] = (512, 512, 512), batch_norm: bool = True,
                     width: int = 1024, train_output_layer: bool = False) -> torch.nn.Module:
    """A freshly initialized classifier; the options that do not apply to `architecture` are ignored."""
    if architecture == "mlp":
        return MLP(in_channels * image_size**2, list(hidden_sizes), num_classes, batch_norm)
    if architecture == "two_layer_relu":
        return TwoLayerReLU(in_channels * image_size**2, width, num_classes, train_output_layer)
    return build_resnet(architecture, in_channels, num_classes, zero_init_residual, width_multiplier)


def export_spec(architecture: str, options: dict[str, Any], in_channels: int, image_size: int,
                class_names: list[str], mean: tuple[float, ...], std: tuple[float, ...],
                resize: int | None) -> dict[str, Any]:
    """What `model.json` holds: enough to rebuild the model and to feed it images as in training."""
    return {
        "architecture": architecture,
        # torchvision's constructor takes the weights as they are only for its own 3-channel stem.
        "torchvision": architecture if architecture in TORCHVISION_RESNETS and in_channels == 3 else None,
        "num_classes": len(class_names),
        "in_channels": in_channels,
        "image_size": image_size,
        "options": {key: options[key] for key in OPTIONS[architecture]},
        "class_names": class_names,
        # Evaluation preprocessing: resize the shorter side to `resize` (when set), center-crop
        # `image_size`, scale to [0, 1], then normalize with mean and std per channel.
        "preprocessing": {"resize": resize, "crop": image_size, "mean": list(mean), "std": list(std)},
    }


def write_exported(out_dir: Path, spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Check the weights against the architecture (strictly), then write both files."""
    from safetensors.torch import save_file

    try:
        from_spec(spec).load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # missing, unexpected or differently shaped tensors
        first_problem = (str(err).splitlines()[1:] or [str(err)])[0].strip()
        raise ConfigError(f"the checkpoint does not match {spec['architecture']}: {first_problem} ...") from None
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(out_dir / WEIGHTS_FILE))
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def load_exported(folder: str | Path) -> torch.nn.Module:
    """The classifier a `distdl export` folder holds, its weights loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    model = from_spec(spec)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model.eval()


def from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    if spec["torchvision"]:
        import torchvision

        return torchvision.models.get_model(spec["torchvision"], weights=None, num_classes=spec["num_classes"])
    return build_classifier(spec["architecture"], spec["in_channels"], spec["image_size"], spec["num_classes"],
                            **spec["options"])
