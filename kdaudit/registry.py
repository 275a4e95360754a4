"""Registries: things by name, failing with the list of names that exist.

Two kinds of entry share one table: builders (`register`: a factory and the dataclass of its
settings, as timm's register_model; datasets, models) and typed descriptions (`add`: an
object with a `name`, e.g. a condition or a metric, read by attribute, never by string key).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    build: Callable[..., T]
    config: type | None  # dataclass holding this entry's settings
    info: dict[str, Any] = field(default_factory=dict)  # static facts (e.g. a model's width)
    about: str = ""  # one line for `kdaudit list`

    def settings(self) -> dict[str, Any]:
        """Its config's fields and their defaults (MISSING: required), `name` left out."""
        if self.config is None:
            return {}
        return {f.name: _default(f) for f in fields(self.config) if f.name != "name"}


def _default(f) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


class Registry(Generic[T]):
    """A name -> entry table, in the order of registration."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def add(self, entry: T) -> T:
        """Register a typed description (any object with a `name`)."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def register(
        self, name: str, config: type | None = None, about: str = "", **info: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a builder `build(cfg, ...)` under `name`; `about` (default:
        the first paragraph of the builder's docstring) describes it in one line."""
        self._check_config(name, config)

        def add(build: Callable[..., Any]) -> Callable[..., Any]:
            summary = about or " ".join((build.__doc__ or "").split("\n\n")[0].split())
            self.add(Entry(name, build, config, info, summary))
            return build

        return add

    def declare(self, name: str, config: type, builder: str, about: str, **info: Any) -> None:
        """Register a builder by its name, 'package.module:function', imported at its first
        call: the entry's settings are known without importing the builder's module."""
        self._check_config(name, config)
        self.add(Entry(name, Deferred(builder), config, info, about))

    def _check_config(self, name: str, config: type | None) -> None:
        default = getattr(config, "__dataclass_fields__", {}).get("name")
        if default is not None and default.default not in (name, MISSING):
            # config() would name (and so build) another entry
            raise ValueError(f"{self.kind} {name!r}: its config class {config.__name__} defaults "
                             f"to name {default.default!r}; give it a class of its own")  # fmt: skip

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        return self.get(cfg.name).build(cfg, *args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[T]:
        """Every entry, in the order of registration."""
        return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries


class Deferred:
    """A function named 'package.module:function', imported at its first call."""

    def __init__(self, reference: str):
        self.reference = reference
        self.__module__, _, self.attribute = reference.partition(":")
        self._function: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._function is None:
            module = importlib.import_module(self.__module__)
            self._function = getattr(module, self.attribute)
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Deferred({self.reference!r})"
