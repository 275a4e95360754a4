"""Image classifiers: torchvision's ResNet, VGG and ViT definitions, adapted to the input's
channel count and, with `small_input`, to 32x32-scale images; and a small CNN for the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tvm

from kdaudit.models import MODELS


@dataclass(frozen=True)
class ResNetConfig:
    name: str = "resnet18"
    # 3x3 stride-1 stem without max-pool, the usual choice for 32x32 images (CIFAR, SVHN)
    small_input: bool = True


@dataclass(frozen=True)
class VGGConfig:
    name: str = "vgg19"
    # global average pool + one linear layer instead of the 7x7x512 -> 4096 -> 4096 head
    small_input: bool = True


@dataclass(frozen=True)
class ResNet50Config(ResNetConfig):
    name: str = "resnet50"


@dataclass(frozen=True)
class VGG19BNConfig(VGGConfig):
    name: str = "vgg19_bn"


@dataclass(frozen=True)
class ViTConfig:
    name: str = "vit"
    patch_size: int = 4
    depth: int = 6
    heads: int = 8
    width: int = 256
    mlp_dim: int = 512
    dropout: float = 0.0


@dataclass(frozen=True)
class CNNConfig:
    name: str = "cnn"
    width: int = 32  # channels of the first block; doubled per block
    depth: int = 2  # conv blocks, each conv3x3-ReLU-maxpool(2); then a linear layer on the
    # flattened features (a global average pool throws away the position small images need)


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


_SMALL = "torchvision {} (small_input: adapted to 32x32 images)"
MODELS.register("resnet18", ResNetConfig, about=_SMALL.format("ResNet-18"))(_resnet(tvm.resnet18))
MODELS.register("resnet50", ResNet50Config, about=_SMALL.format("ResNet-50"))(_resnet(tvm.resnet50))
MODELS.register("vgg19", VGGConfig, about=_SMALL.format("VGG-19"))(_vgg(tvm.vgg19))
MODELS.register("vgg19_bn", VGG19BNConfig, about=_SMALL.format("VGG-19-BN"))(_vgg(tvm.vgg19_bn))


@MODELS.register(
    "vit",
    ViTConfig,
    width="width",
    width_multiple_of="heads",
    about="torchvision Vision Transformer",
)
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


@MODELS.register(
    "cnn",
    CNNConfig,
    width="width",
    about="small 2-D CNN: conv-ReLU-maxpool blocks doubling in width, then linear",
)
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
