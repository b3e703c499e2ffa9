"""Fully connected classifiers for the studies.

- `MLP`: flatten, then Linear [-> BatchNorm] -> ReLU per hidden layer, then the output layer: the
  784-512-512-512-10 network with batch norm on which Keskar et al.'s large-batch sharpness shows.
- `TwoLayerReLU`: Du et al. 2018's f(x) = (1/sqrt(m)) sum_r a_r relu(w_r . x), w_r ~ N(0, I), a_r
  uniform on {-1, +1}, inputs scaled to unit norm as their analysis assumes; by default only W
  trains, as in it. The 1/sqrt(m) output scaling (the neural-tangent parametrization) is what makes
  wide networks move little from their start.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_sizes: list[int], num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers.append(nn.Linear(width, hidden, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TwoLayerReLU(nn.Module):
    def __init__(self, in_features: int, width: int, num_classes: int, train_output_layer: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width, bias=False)
        nn.init.normal_(self.hidden.weight)  # N(0, I) rows, as Du et al.
        signs = torch.randint(0, 2, (num_classes, width)).float() * 2 - 1
        self.output = nn.Linear(width, num_classes, bias=False)
        with torch.no_grad():
            self.output.weight.copy_(signs)
        self.output.weight.requires_grad_(train_output_layer)
        self.relu = nn.ReLU()
        self.scale = 1 / math.sqrt(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(torch.flatten(x, 1), dim=1)
        return self.output(self.relu(self.hidden(x))) * self.scale
