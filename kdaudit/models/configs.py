"""The built-in models' settings and their registration, with nothing heavy imported:
configs are read and checked (and `kdaudit list` answers) before torch loads. Each entry
names its builder as 'module:function', imported when a model is first built.

info `width`: the field capacity scaling (protocol.student_widths) scales;
`width_multiple_of`: the field the width must be a multiple of (attention heads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdaudit.models import MODELS
from kdaudit.user_code import check_factory, frozen


@dataclass(frozen=True)
class VGGishConfig:
    name: str = "vggish"
    channels: tuple[int, ...] = (64, 128, 256, 512)  # per block; each block ends in a max pool
    convs: tuple[int, ...] = (1, 1, 2, 2)  # 3x3 convs per block (VGGish: 64, 128, 2x256, 2x512)
    batch_norm: bool = True  # the original VGGish has none
    dropout: float = 0.0  # before the linear head

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.convs) or not self.channels:
            raise ValueError("model.channels and model.convs must be non-empty and equally long")


@dataclass(frozen=True)
class AudioCNNConfig:
    name: str = "audio_cnn"
    width: int = 32  # channels of the first block, doubled in each further block
    depth: int = 3  # blocks of (1D conv over frames, batch norm, ReLU, max pool)
    kernel_size: int = 3  # frames


@dataclass(frozen=True)
class ASTConfig:
    name: str = "ast"
    patch_size: int = 8  # square patches over (mel band, frame)
    patch_stride: int = 8  # < patch_size: overlapping patches (the AST paper: 16 and 10)
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.heads")


@dataclass(frozen=True)
class CNN1DConfig:
    name: str = "cnn1d"
    width: int = 32  # channels per conv layer
    depth: int = 3  # conv layers
    kernel_size: int = 5


@dataclass(frozen=True)
class FactoryModelConfig:
    factory: str  # package.module:function
    kwargs: Any = field(default_factory=dict)  # passed to the factory after the seed
    name: str = "factory"  # implied by the `factory` key

    def __post_init__(self) -> None:
        check_factory(self)

    def __hash__(self) -> int:  # kwargs is a dict; configs key caches
        return hash((self.name, self.factory, frozen(self.kwargs)))


@dataclass(frozen=True)
class InMemoryModelConfig:
    factory: str  # module:qualname, for people reading the config
    fingerprint: str  # name, architecture, seed-0 weights: the factory's key in this process
    name: str = "in_memory"


@dataclass(frozen=True)
class GPTConfig:
    name: str = "nanogpt"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False


@dataclass(frozen=True)
class PicoGPTConfig(GPTConfig):
    name: str = "picogpt"
    n_embd: int = 192  # half of NanoGPT's width (PROTOCOL section 7.3)


@dataclass(frozen=True)
class MLPConfig:
    name: str = "mlp"
    width: int = 256
    depth: int = 2  # hidden layers


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


# ---------------------------------------------------------------- registration


def _declare(name: str, config: type, builder: str, about: str, **info: str) -> None:
    MODELS.declare(name, config, f"kdaudit.models.{builder}", about=about, **info)


_SMALL = "torchvision {} (small_input: adapted to 32x32 images)"
_declare(
    "vggish", VGGishConfig, "audio:build_vggish", "VGGish-style 2-D CNN on log-mel spectrograms"
)
_declare(
    "audio_cnn",
    AudioCNNConfig,
    "audio:build_audio_cnn",
    "temporal CNN: mel bands as channels, 1-D convolutions over frames",
    width="width",
)
_declare(
    "ast",
    ASTConfig,
    "audio:build_ast",
    "audio spectrogram transformer (patches of the log-mel spectrogram)",
    width="dim",
    width_multiple_of="heads",
)
_declare(
    "cnn1d",
    CNN1DConfig,
    "cnn1d:build_cnn1d",
    "small 1-D CNN: stride-2 conv blocks, then a linear head",
    width="width",
)
_declare(
    "factory",
    FactoryModelConfig,
    "factory:build_factory_model",
    "your own model: factory(seed, **kwargs) returns an nn.Module giving logits",
)
_declare(
    "in_memory",
    InMemoryModelConfig,
    "factory:build_in_memory_model",
    "a model factory passed to kdaudit.audit() in this process (not for configs)",
)
_declare(
    "nanogpt",
    GPTConfig,
    "gpt:build_gpt",
    "nanoGPT-style causal transformer (next-token logits)",
    width="n_embd",
    width_multiple_of="n_head",
)
_declare(
    "picogpt",
    PicoGPTConfig,
    "gpt:build_gpt",
    "nanogpt at half the width (a smaller student)",
    width="n_embd",
    width_multiple_of="n_head",
)
_declare(
    "mlp",
    MLPConfig,
    "mlp:build_mlp",
    "multilayer perceptron: depth hidden layers of width units",
    width="width",
)
_declare("resnet18", ResNetConfig, "vision:build_resnet18", _SMALL.format("ResNet-18"))
_declare("resnet50", ResNet50Config, "vision:build_resnet50", _SMALL.format("ResNet-50"))
_declare("vgg19", VGGConfig, "vision:build_vgg19", _SMALL.format("VGG-19"))
_declare("vgg19_bn", VGG19BNConfig, "vision:build_vgg19_bn", _SMALL.format("VGG-19-BN"))
_declare(
    "vit",
    ViTConfig,
    "vision:build_vit",
    "torchvision Vision Transformer",
    width="width",
    width_multiple_of="heads",
)
_declare(
    "cnn",
    CNNConfig,
    "vision:build_cnn",
    "small 2-D CNN: conv-ReLU-maxpool blocks doubling in width, then linear",
    width="width",
)
