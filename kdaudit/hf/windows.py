"""Which window scores which position: every position with a next token exactly once.

A sequence x[0..L) has L - 1 positions p = 0..L-2, the output at p predicting x[p + 1].
Window w feeds x[b : e), b = w * stride, e = min(b + context, L), and keeps the outputs of
the positions no earlier window kept: [end of window w - 1, min(b + context, L - 1)). So
the first window keeps all its positions, each later one its last `stride` positions (each
seen with at least context - stride tokens before it), and the last window may be shorter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    sequence: int  # row of the corpus (0 for a text)
    start: int  # first input token, b
    stop: int  # one past the last input token, e
    first: int  # first kept position (absolute, >= start)
    last: int  # one past the last kept position (absolute, <= stop)

    @property
    def length(self) -> int:
        return self.stop - self.start


def check(length: int, context: int, stride: int) -> None:
    if length < 2:
        raise ValueError(f"the corpus has {length} token(s); at least 2 are needed to score one")
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"--stride must be between 1 and --context ({context}), got {stride}")


def windows(length: int, context: int, stride: int, sequence: int = 0) -> Iterator[Window]:
    """The windows of one sequence of `length` tokens, in order."""
    check(length, context, stride)
    kept = 0  # positions kept so far
    start = 0
    while kept < length - 1:
        last = min(start + context, length - 1)
        yield Window(sequence, start, min(start + context, length), kept, last)
        kept, start = last, start + stride


def batches(sequences: int, length: int, context: int, stride: int,
            batch_size: int) -> list[list[Window]]:  # fmt: skip
    """Windows of every sequence in order, grouped into batches of consecutive windows of
    one input length (no padding), at most `batch_size` each. A pure function of its
    arguments: a resumed run finds the same batches."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out: list[list[Window]] = []
    for s in range(sequences):
        for w in windows(length, context, stride, s):
            if out and len(out[-1]) < batch_size and out[-1][0].length == w.length:
                out[-1].append(w)
            else:
                out.append([w])
    return out
