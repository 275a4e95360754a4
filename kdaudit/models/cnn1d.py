"""A small 1D convolutional network (stride-2 conv blocks, then a linear head)."""

from __future__ import annotations

import torch
from torch import nn

from kdaudit.models.configs import CNN1DConfig


def build_cnn1d(cfg: CNN1DConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, _length = input_shape  # (C, L)
    layers: list[nn.Module] = []
    for _ in range(cfg.depth):
        layers += [
            nn.Conv1d(channels, cfg.width, cfg.kernel_size, stride=2, padding=cfg.kernel_size // 2),
            nn.ReLU(),
        ]
        channels = cfg.width
    features = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        n_features = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(features, nn.Linear(n_features, num_classes))
