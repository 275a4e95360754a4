"""The built-in datasets' settings and their registration, with nothing heavy imported:
configs are read and checked (and `kdaudit list` answers) before torch loads. Each entry
names its builder as 'module:function', imported when a dataset is first built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kdaudit import user_code
from kdaudit.data import DATASETS

if TYPE_CHECKING:
    from kdaudit.data.audio_features import LogMel

# ---------------------------------------------------------------- audio (kdaudit.data.audio)


@dataclass(frozen=True)
class AudioConfig:
    """Feature settings shared by the audio datasets (PROTOCOL section 9)."""

    name: str
    seconds: float = 1.0  # clip duration after zero-padding or cutting the end
    sample_rate: int = 16_000  # Hz, after resampling
    n_fft: int = 512  # samples per STFT window (Hann)
    hop_length: int = 256  # samples between frames
    n_mels: int = 32

    def __post_init__(self) -> None:
        for key in ("seconds", "sample_rate", "n_fft", "hop_length", "n_mels"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be > 0, got {getattr(self, key)}")

    def features(self) -> LogMel:
        from kdaudit.data.audio_features import LogMel

        return LogMel(self.sample_rate, self.seconds, self.n_fft, self.hop_length, self.n_mels)


@dataclass(frozen=True)
class FSDDConfig(AudioConfig):
    name: str = "fsdd"
    n_files: int | None = 3000  # recordings expected (release 1.0.10); None skips the check


@dataclass(frozen=True)
class SpeechCommandsConfig(AudioConfig):
    name: str = "speechcommands"
    validation: str = "drop"  # drop | train: what happens to validation_list.txt's clips
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.validation not in ("drop", "train"):
            raise ValueError(f"data.validation: {self.validation!r}; choose drop or train")


@dataclass(frozen=True)
class UrbanSound8KConfig(AudioConfig):
    name: str = "urbansound8k"
    seconds: float = 4.0  # the longest slices
    test_size: float = 0.2  # fraction of clips (of each class, when stratified) held out
    split_seed: int = 42
    stratify: bool = True
    test_folds: tuple[int, ...] = ()  # non-empty: these official folds are the test set instead
    download: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.test_size < 1.0:
            raise ValueError(f"data.test_size must be in (0, 1), got {self.test_size}")
        if any(f not in range(1, 11) for f in self.test_folds):
            raise ValueError(f"data.test_folds must be folds 1..10, got {list(self.test_folds)}")


# ---------------------------------------------------------------- the others


@dataclass(frozen=True)
class MNIST1DConfig:
    name: str = "mnist1d"
    n_train: int = 10_000
    n_test: int = 2_000
    seed: int = 42  # the generator's seed; fixed so every run sees the same dataset
    shuffle_seq: bool = False


@dataclass(frozen=True)
class TextConfig:
    name: str = "tinyshakespeare"
    block_size: int = 256  # context length of a window
    train_fraction: float = 0.9  # the first 90% of the text trains, the rest tests
    download: bool = True


@dataclass(frozen=True)
class THAConfig(TextConfig):
    name: str = "tinyshakespeare_tha"


@dataclass(frozen=True)
class FactoryDataConfig:
    factory: str  # package.module:function
    kwargs: Any = field(default_factory=dict)  # passed to the factory after data_dir
    num_classes: int | None = None  # None: max label + 1
    name: str = "factory"  # implied by the `factory` key

    def __post_init__(self) -> None:
        user_code.check_factory(self)

    def __hash__(self) -> int:  # kwargs is a dict; load_data caches by config
        return hash((self.name, self.factory, user_code.frozen(self.kwargs), self.num_classes))


@dataclass(frozen=True)
class InMemoryDataConfig:
    sha256: str  # of the materialised tensors: the key of the data in this process
    name: str = "in_memory"


@dataclass(frozen=True)
class ImageConfig:
    name: str
    n_train: int | None = None  # the first n examples of the split; None: all
    n_test: int | None = None
    mean: tuple[float, ...] | None = None  # None: the dataset's default normalisation
    std: tuple[float, ...] | None = None
    download: bool = True


@dataclass(frozen=True)
class FolderImageConfig(ImageConfig):
    image_size: int = 64  # images are resized (shorter side) and centre-cropped to this


# ---------------------------------------------------------------- registration


def _declare(name: str, config: type, builder: str, about: str) -> None:
    DATASETS.declare(name, config, f"kdaudit.data.{builder}", about=about)


_declare(
    "fsdd",
    FSDDConfig,
    "audio:build_fsdd",
    "Free Spoken Digit Dataset: digits 0-9 (8 kHz recordings); official split: file "
    "index 0-4 test, 5-49 train",
)
_declare(
    "speechcommands",
    SpeechCommandsConfig,
    "audio:build_speechcommands",
    "Speech Commands v2: 35 words (1 s, 16 kHz); test = testing_list.txt (downloaded when missing)",
)
_declare(
    "urbansound8k",
    UrbanSound8KConfig,
    "audio:build_urbansound8k",
    "UrbanSound8K: 10 urban sound classes (slices up to 4 s); test = a seeded fraction "
    "per class, or official folds (downloaded when missing)",
)
_declare(
    "mnist1d",
    MNIST1DConfig,
    "mnist1d:build_mnist1d",
    "MNIST-1D: 10 classes of 1-D signals (40 samples), generated; no download",
)
_declare(
    "tinyshakespeare",
    TextConfig,
    "text:build_tinyshakespeare",
    "TinyShakespeare characters (DATA/tinyshakespeare/input.txt, downloaded when "
    "missing): next-character prediction",
)
_declare(
    "tinyshakespeare_tha",
    THAConfig,
    "text:build_tinyshakespeare_tha",
    'the adversarial teacher\'s text: TinyShakespeare with every "the" as "tha"',
)
_declare(
    "factory",
    FactoryDataConfig,
    "user:build_factory_data",
    "your own data: factory(data_dir, **kwargs) returns (train, test)",
)
_declare(
    "in_memory",
    InMemoryDataConfig,
    "user:build_in_memory_data",
    "data passed to kdaudit.audit() in this process (not for configs)",
)
_declare(
    "fashion_mnist",
    ImageConfig,
    "vision:build_fashion_mnist",
    "Fashion-MNIST (IDX files in DATA/fashion-mnist, downloaded when missing)",
)
_declare(
    "svhn",
    ImageConfig,
    "vision:build_svhn",
    "SVHN cropped digits (.mat files in DATA/svhn, downloaded when missing)",
)
_declare(
    "cifar10",
    ImageConfig,
    "vision:build_cifar10",
    "CIFAR-10 (the python archive in DATA/cifar10, downloaded when missing)",
)
_declare(
    "tinyimagenet",
    ImageConfig,
    "vision:build_tinyimagenet",
    "TinyImageNet (the official zip; its labelled val split is the test set)",
)
_declare(
    "imagenet",
    FolderImageConfig,
    "vision:build_imagenet",
    "ImageNet in class folders imagenet/{train,val}/<class>/*.JPEG, resized to image_size",
)
