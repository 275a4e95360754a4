"""A plain ReLU multilayer perceptron on flattened inputs."""

from __future__ import annotations

import math

from torch import nn

from kdaudit.models.configs import MLPConfig


def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = math.prod(input_shape)
    for _ in range(cfg.depth):
        layers += [nn.Linear(width_in, cfg.width), nn.ReLU()]
        width_in = cfg.width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)
