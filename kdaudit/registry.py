"""Registries: build things by name, and fail with the list of names that exist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    build: Callable[..., T]
    config: type | None  # dataclass holding this entry's settings
    info: dict[str, Any]  # static facts about the entry (e.g. a condition's grid axes)


class Registry(Generic[T]):
    """A name -> (factory, config class) table, like timm's register_model/create_model."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, config: type | None = None, **info: Any
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(build: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, build, config, info)
            return build

        return add

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> T:
        return self.get(cfg.name).build(cfg, *args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """Every entry, in the order of registration."""
        return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
