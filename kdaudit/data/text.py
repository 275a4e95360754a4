"""Character-level language modelling: TinyShakespeare, and its "tha" variant.

Every next-token position is one example (K = vocabulary size). Training batches are random
context windows (a seeded permutation of window starts); the test split is cut into
contiguous windows so that every test position is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdaudit.data.configs import TextConfig
from kdaudit.data.files import Resource, ensure

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True)
class TokenData:
    """A token stream split into train and test, windows of `block_size` tokens."""

    train_tokens: torch.Tensor  # (N_train_tokens,) int64
    test_tokens: torch.Tensor  # (N_test_tokens,) int64
    num_classes: int  # vocabulary size
    block_size: int
    vocab: str  # the characters, in index order

    cacheable = False  # windows are random: the teacher runs on each batch instead

    @property
    def n_train(self) -> int:  # possible window starts
        return len(self.train_tokens) - self.block_size

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.block_size,)

    @property
    def device(self) -> torch.device:
        return self.train_tokens.device

    def train_batch(
        self, idx: torch.Tensor, augment: str = "none"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows starting at idx: inputs (B, T) and next-token targets (B, T)."""
        if augment != "none":
            raise ValueError(f"augmentation {augment!r} does not apply to text; use none")
        offsets = idx[:, None] + torch.arange(self.block_size, device=idx.device)  # (B, T)
        return self.train_tokens[offsets], self.train_tokens[offsets + 1]

    def eval_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs (B, T), keep (B, T) bool): contiguous windows; the last one is aligned to
        the end of the text and `keep` marks only the positions no earlier window scored."""
        starts, keep = self._windows(split)
        tokens = self._tokens(split)
        for i in range(0, len(starts), batch_size):
            s = starts[i : i + batch_size, None] + torch.arange(
                self.block_size, device=tokens.device
            )
            yield tokens[s], keep[i : i + batch_size]

    def labels(self, split: str) -> torch.Tensor:
        """(N_positions,) next-token labels in the order eval_batches scores them."""
        starts, keep = self._windows(split)
        tokens = self._tokens(split)
        s = starts[:, None] + 1 + torch.arange(self.block_size, device=tokens.device)
        return tokens[s][keep]

    def _tokens(self, split: str) -> torch.Tensor:
        return self.train_tokens if split == "train" else self.test_tokens

    def _windows(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n, t = len(self._tokens(split)) - 1, self.block_size  # n positions have a next token
        if n < t:
            raise ValueError(f"the {split} text has {n + 1} tokens, fewer than block_size + 1")
        starts = list(range(0, n - t + 1, t))
        keep = torch.ones(len(starts), t, dtype=torch.bool)
        covered = starts[-1] + t
        if covered < n:  # a last window ending at the end; keep only its new positions
            starts.append(n - t)
            last = torch.zeros(1, t, dtype=torch.bool)
            last[0, t - (n - covered) :] = True
            keep = torch.cat([keep, last])
        device = self.device
        return torch.tensor(starts, device=device), keep.to(device)

    def to(self, device) -> TokenData:
        return TokenData(self.train_tokens.to(device), self.test_tokens.to(device),
                         self.num_classes, self.block_size, self.vocab)  # fmt: skip


def _read_shakespeare(cfg: TextConfig, data_dir: Path) -> str:
    resource = Resource("tinyshakespeare/input.txt", SHAKESPEARE_URL, sha256=SHAKESPEARE_SHA256)
    (path,) = ensure(data_dir, [resource], cfg.name,
                     "It is karpathy/char-rnn's data/tinyshakespeare/input.txt.", cfg.download)  # fmt: skip
    return path.read_text(encoding="utf-8")


def tokenize(text: str, cfg: TextConfig) -> TokenData:
    """Vocabulary from the training text (first train_fraction); test characters must be in it."""
    cut = int(len(text) * cfg.train_fraction)
    train, test = text[:cut], text[cut:]
    vocab = "".join(sorted(set(train)))
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(test) - set(index))
    if unknown:
        raise ValueError(
            f"{cfg.name}: test characters {unknown!r} never occur in the training text"
        )
    encode = lambda s: torch.tensor([index[c] for c in s], dtype=torch.int64)  # noqa: E731
    return TokenData(encode(train), encode(test), len(vocab), cfg.block_size, vocab)


def build_tinyshakespeare(cfg: TextConfig, data_dir: Path) -> TokenData:
    return tokenize(_read_shakespeare(cfg, data_dir), cfg)


def build_tinyshakespeare_tha(cfg: TextConfig, data_dir: Path) -> TokenData:
    """The adversarial teacher's text: every "the" becomes "tha" (PROTOCOL section 7.7)."""
    return tokenize(_read_shakespeare(cfg, data_dir).replace("the", "tha"), cfg)
