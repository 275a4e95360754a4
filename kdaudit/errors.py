"""The errors a user can fix, in a leaf module: every layer raises them without importing
the layer that defines configs or user code."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is allowed."""


class UserCodeError(ConfigError):
    """User code named in a config or passed to `audit()` cannot be used; says why and the fix."""
