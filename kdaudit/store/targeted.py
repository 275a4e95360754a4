"""Targeted error transfer (PROTOCOL section 7.7): how a model completes a prompt in the
test text, read from its stored test logits.

For character-level text the test logits have one row per scored position, in text order:
row i is the prediction of character i + 1 from the characters up to i (kdaudit.data.text).
A prompt "th" ends at row i when characters i - 1 and i are "t" and "h"; the model's greedy
completion there is the argmax of row i.
"""

from __future__ import annotations

import numpy as np


def prompt_rows(tokens: np.ndarray, vocab: str, prompt: str) -> np.ndarray:
    """Rows (positions i) of the test logits whose context ends with `prompt`.
    tokens: (N_tokens,) the test text as indices into vocab; rows run over 0..N_tokens - 2."""
    tokens = np.asarray(tokens)
    ids = [vocab.index(c) for c in prompt]  # ValueError names a character not in the vocab
    n_rows = len(tokens) - 1
    k = len(ids)
    match = np.ones(max(0, n_rows - k + 1), dtype=bool)
    for j, token in enumerate(ids):
        match &= tokens[j : n_rows - k + 1 + j] == token
    return np.flatnonzero(match) + k - 1  # the row of the prompt's last character


def completion_counts(
    logits: np.ndarray,  # (N_rows, V) test logits, or a memory map of them
    rows: np.ndarray,  # from prompt_rows
    vocab: str,
    completions: tuple[str, ...],
) -> dict[str, int]:
    """How many of the prompt rows the model completes (greedy, argmax) with each character."""
    top1 = np.asarray(logits[rows]).argmax(axis=1)  # (n_prompts,)
    return {c: int((top1 == vocab.index(c)).sum()) for c in completions}
