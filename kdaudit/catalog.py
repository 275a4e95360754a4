"""What a config can name, for `kdaudit list`: the registered datasets, models and
conditions with a one-line description and their settings, and the configs shipped in
configs/."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("datasets", "models", "conditions", "configs")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # a source checkout's


@dataclass(frozen=True)
class Item:
    name: str
    about: str
    settings: dict[str, Any] = field(default_factory=dict)  # setting -> default (MISSING: required)


def catalog(kind: str) -> list[Item]:
    """The entries of one kind (one of KINDS), in a stable order."""
    if kind not in KINDS:
        from kdaudit.errors import ConfigError

        raise ConfigError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return {"datasets": _datasets, "models": _models, "conditions": _conditions,
            "configs": _configs}[kind]()  # fmt: skip


def _datasets() -> list[Item]:
    from kdaudit.data import DATASETS

    return [Item(e.name, e.about, e.settings()) for e in DATASETS.entries()]


def _models() -> list[Item]:
    from kdaudit.models import MODELS

    return [Item(e.name, e.about, e.settings()) for e in MODELS.entries()]


def _conditions() -> list[Item]:
    from kdaudit.conditions import CONDITIONS

    entries = sorted(CONDITIONS.entries(), key=lambda c: c.order)
    return [Item(c.name, _about(c), _grid_settings(c)) for c in entries]


def _about(c) -> str:
    """'SIDDO (Same initialisation, different data order): an independent student ...'"""
    named = f"{c.label} ({c.long_name})" if c.long_name and c.long_name != c.label else c.label
    return f"{named}: {c.plain}" if c.plain else named


def _grid_settings(c) -> dict[str, Any]:
    """A condition's settings are the protocol's grid axes and, for a treatment, the
    controls its verdict needs."""
    settings: dict[str, Any] = {"role": c.role}
    if c.params:
        settings["grid"] = ", ".join(f"protocol.{p}s" for p in c.params)
    if c.controls:
        settings["controls"] = ", ".join(c.controls)
    return settings


def _configs(root: Path = CONFIGS) -> list[Item]:
    return [Item(str(p.relative_to(root.parent)), _first_sentence(p))
            for p in sorted(root.rglob("*.yaml"))]  # fmt: skip


def _first_sentence(path: Path) -> str:
    """The first sentence of the comment block a config opens with, else its file name."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    return (text[: end + 1] if end >= 0 else text) or path.stem


def describe_setting(value: Any) -> str:
    """A default as the config would write it ('required' where there is none)."""
    if value is MISSING:
        return "required"
    return repr(list(value) if isinstance(value, tuple) else value)
