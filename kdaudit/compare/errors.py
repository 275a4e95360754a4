"""The one error type of `kdaudit compare`: a problem with the manifest or its files."""

from __future__ import annotations


class CompareError(ValueError):
    """A manifest or logits/labels file that cannot be audited; the message is one line
    naming the manifest line and/or the file(s) involved, and what to change."""
