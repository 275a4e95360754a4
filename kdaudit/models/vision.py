"""Image classifiers: torchvision's ResNet, VGG and ViT definitions, adapted to the input's
channel count and, with `small_input`, to 32x32-scale images; and a small CNN for the CPU."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm

from kdaudit.models.configs import (
    CNNConfig,
    ResNetConfig,
    VGGConfig,
    ViTConfig,
)


def _resnet(factory):
    def build(cfg: ResNetConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        channels = input_shape[0]
        model = factory(num_classes=num_classes)
        if cfg.small_input:
            model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif channels != 3:
            model.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        return model

    return build


def _vgg(factory):
    def build(cfg: VGGConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        model = factory(num_classes=num_classes)
        if input_shape[0] != 3:
            model.features[0] = nn.Conv2d(input_shape[0], 64, 3, padding=1)
        if cfg.small_input:
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Linear(512, num_classes)
        return model

    return build


build_resnet18 = _resnet(tvm.resnet18)
build_resnet50 = _resnet(tvm.resnet50)
build_vgg19 = _vgg(tvm.vgg19)
build_vgg19_bn = _vgg(tvm.vgg19_bn)


def build_vit(cfg: ViTConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    if height != width or height % cfg.patch_size:
        raise ValueError(f"vit needs square images divisible by patch_size; got {height}x{width}")
    model = tvm.VisionTransformer(
        image_size=height, patch_size=cfg.patch_size, num_layers=cfg.depth, num_heads=cfg.heads,
        hidden_dim=cfg.width, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout, num_classes=num_classes,
    )  # fmt: skip
    if channels != 3:
        model.conv_proj = nn.Conv2d(channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
    return model


def build_cnn(cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels, width = input_shape[0], cfg.width
    for _ in range(cfg.depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels, width = width, width * 2
    features = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        n_features = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(features, nn.Linear(n_features, num_classes))
