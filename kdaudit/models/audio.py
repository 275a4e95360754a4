"""Models for log-mel spectrograms (B, 1, n_mels, frames): a VGGish-style CNN, a small
temporal CNN for CPU-scale runs, and a small Audio Spectrogram Transformer (AST)."""

from __future__ import annotations

import torch
from torch import nn

from kdaudit.models.configs import ASTConfig, AudioCNNConfig, VGGishConfig


class ConvNet(nn.Module):
    """VGG-style blocks of 3x3 convs (+ batch norm) + ReLU, each ending in a 2x2 max pool
    (1 along an axis already pooled down to 1), then global average pooling and a linear head."""

    def __init__(self, input_shape, channels, convs, batch_norm, dropout, num_classes):
        super().__init__()
        c, h, w = input_shape  # (C, n_mels, frames)
        blocks = []
        for out, n in zip(channels, convs, strict=True):
            layers: list[nn.Module] = []
            for _ in range(n):
                layers += [nn.Conv2d(c, out, 3, padding=1, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(out)] if batch_norm else []
                layers += [nn.ReLU(inplace=True)]
                c = out
            kernel = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
            layers += [nn.MaxPool2d(kernel)] if kernel != (1, 1) else []
            h, w = h // kernel[0], w // kernel[1]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))  # (B, C) -> (B, K)


def build_vggish(cfg: VGGishConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ConvNet(input_shape, cfg.channels, cfg.convs, cfg.batch_norm, cfg.dropout, num_classes)


class TemporalCNN(nn.Module):
    """Mel bands as channels, 1D convolutions over frames (as in TC-ResNet for keyword
    spotting), then global average pooling over time and a linear head. Several times fewer
    operations than 2D 3x3 convolutions of similar width, so it trains fast on a CPU."""

    def __init__(self, cfg: AudioCNNConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c, n_mels, length = input_shape  # (C, n_mels, frames)
        channels, blocks = c * n_mels, []
        for i in range(cfg.depth):
            out = cfg.width * 2**i
            layers = [
                nn.Conv1d(channels, out, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=False),
                nn.BatchNorm1d(out),
                nn.ReLU(inplace=True),
            ]
            layers += [nn.MaxPool1d(2)] if length >= 2 else []
            length, channels = max(1, length // 2), out
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.flatten(1, 2)).mean(dim=2))  # (B, C*M, T) -> (B, K)


def build_audio_cnn(
    cfg: AudioCNNConfig, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    return TemporalCNN(cfg, input_shape, num_classes)


class AST(nn.Module):
    """Patches of the spectrogram, embedded by a strided conv, plus a CLS token and learned
    positional embeddings, through a pre-norm transformer encoder; logits from the CLS token."""

    def __init__(self, cfg: ASTConfig, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        c, h, w = input_shape  # (C, n_mels, frames)
        p, s = cfg.patch_size, cfg.patch_stride
        if h < p or w < p:
            raise ValueError(f"ast: input {h}x{w} is smaller than model.patch_size {p}")
        n_patches = ((h - p) // s + 1) * ((w - p) // s + 1)
        self.patches = nn.Conv2d(c, cfg.dim, p, stride=s)
        self.cls = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, cfg.dim), std=0.02))
        self.pos = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(1, 1 + n_patches, cfg.dim), std=0.02)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.TransformerEncoder(
            _layer(cfg), cfg.depth, norm=nn.LayerNorm(cfg.dim), enable_nested_tensor=False
        )
        # nn.TransformerEncoder deep-copies one layer, so every layer would start identical
        self.encoder.layers = nn.ModuleList(_layer(cfg) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.encoder(self.dropout(tokens))[:, 0])  # CLS token -> (B, K)


def _layer(cfg: ASTConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        cfg.dim,
        cfg.heads,
        round(cfg.dim * cfg.mlp_ratio),
        cfg.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


def build_ast(cfg: ASTConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return AST(cfg, input_shape, num_classes)
