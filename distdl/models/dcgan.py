"""DCGAN (Radford et al. 2016): transposed-convolution generator and convolutional discriminator.

The paper's choices: batch norm in both nets (not on the generator's output nor the discriminator's
input), ReLU in the generator with a tanh output, LeakyReLU 0.2 in the discriminator, weights drawn
from N(0, 0.02). The maps double from a small start (4x4, or 7x7 for 28-pixel MNIST) to the image
size, so 28, 32 and 64-pixel datasets use the same code. For WGAN-GP's critic (Gulrajani et al. 2017)
the discriminator takes layer norm instead of batch norm: the gradient penalty is per sample, and
batch norm would couple the samples of a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from distdl.errors import ConfigError

NORMS = ("batch", "layer", "none")


def upsamplings(image_size: int) -> tuple[int, int]:
    """(start side, doublings) with start * 2**doublings == image_size and a start of 4 to 7."""
    doublings, side = 0, image_size
    while side > 7 and side % 2 == 0:
        side //= 2
        doublings += 1
    if not 4 <= side <= 7 or doublings == 0:
        raise ConfigError(f"DCGAN needs an image side of 4..7 times a power of two (28, 32, 64, ...), not {image_size}")
    return side, doublings


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for convolutions; N(1, 0.02) scale and zero shift for norms (the DCGAN paper)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        start, doublings = upsamplings(image_size)
        self.latent_dim = latent_dim
        features = width * 2 ** (doublings - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, features, start, 1, 0, bias=False),
                                   nn.BatchNorm2d(features), nn.ReLU(True)]
        for _ in range(doublings - 1):
            layers += [nn.ConvTranspose2d(features, features // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(features // 2), nn.ReLU(True)]
            features //= 2
        layers += [nn.ConvTranspose2d(features, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.net(noise.view(noise.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """One logit per image (DCGAN), or one critic value (WGAN-GP)."""

    def __init__(self, channels: int, image_size: int, width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"discriminator norm {norm!r} is not one of {', '.join(NORMS)}")
        start, doublings = upsamplings(image_size)
        features = width
        layers: list[nn.Module] = [nn.Conv2d(channels, features, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for _ in range(doublings - 1):
            layers += [nn.Conv2d(features, features * 2, 4, 2, 1, bias=False), _norm(norm, features * 2),
                       nn.LeakyReLU(0.2, True)]
            features *= 2
        layers.append(nn.Conv2d(features, 1, start, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).view(-1)


def _norm(kind: str, features: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(features)
    if kind == "layer":
        return nn.GroupNorm(1, features)  # layer norm over (C, H, W) per sample
    return nn.Identity()
