"""Test logits of Hugging Face causal language models, for `kdaudit compare` (`kdaudit
logits`): a locally saved model scored on a corpus, every position that has a next token
exactly once, in windows, streamed to disk and resumable.

    windows.py   which window scores which position (pure arithmetic)
    corpus.py    the corpus as token ids (.txt, .jsonl, .npy), tokenized as a whole
    identity.py  what must match between teacher and students (tokenizer, token ids,
                 vocabulary size): the sidecar of every file, its checks, the manifest row
    output.py    the output files, written block by block and resumable
    score.py     the model, its forward passes and the loop

Importing this package is light; `transformers` (the optional extra `kdaudit[hf]`) is
imported by the call that needs it.
"""

from __future__ import annotations

from kdaudit.errors import ConfigError

INSTALL_HINT = "pip install 'kdaudit[hf]'"


class LogitsError(ConfigError):
    """A model, corpus or output that cannot be scored; one line naming the problem and the fix."""


def require_transformers():
    """The `transformers` module, or a LogitsError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise LogitsError(
            f"kdaudit logits needs the Hugging Face `transformers` package: {INSTALL_HINT}"
        ) from None
    return transformers
