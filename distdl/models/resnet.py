"""ResNets by name: torchvision's ImageNet ResNets, and the CIFAR ResNets of He et al. 2016 (section 4.2).

The CIFAR ResNets: a 3x3 convolution with 16 filters, three stages of n basic blocks with 16, 32 and
64 filters (the feature map halved between stages), global average pooling and the classifier;
depth 6n + 2. Shortcuts are identities, zero-padded where the channels double (the paper's option A),
so they add no parameters: ResNet-56 has 0.85M, ResNet-110 1.7M, as the paper's table 6 lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distdl.errors import ConfigError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                       "wide_resnet101_2")
CIFAR_RESNETS = {f"cifar_resnet{depth}": depth for depth in (20, 32, 44, 56, 110)}
MODEL_NAMES = (*TORCHVISION_RESNETS, *CIFAR_RESNETS)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride, self.extra_channels = stride, channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """`width` scales every stage's channels (16k, 32k, 64k), as Nakkiran et al. 2019 widen their ResNets."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"a CIFAR ResNet has depth 6n + 2, not {depth}")
        blocks = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16 * width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16 * width)
        layers, channels = [], 16 * width
        for stage, width in enumerate((16 * width, 32 * width, 64 * width)):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # He et al. 2015, as the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def build_resnet(name: str, in_channels: int, num_classes: int, zero_init_residual: bool = False,
                 width: int = 1) -> nn.Module:
    """A freshly initialized ResNet for `in_channels`-channel images and `num_classes` classes."""
    if name in CIFAR_RESNETS:
        return CifarResNet(CIFAR_RESNETS[name], in_channels, num_classes, width)
    if name not in TORCHVISION_RESNETS:
        raise ConfigError(f"model.name={name!r} is not known; known: {', '.join(MODEL_NAMES)}")
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                         zero_init_residual=zero_init_residual)
    if in_channels != 3:
        # The ImageNet stem, for grayscale (or other) inputs.
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
