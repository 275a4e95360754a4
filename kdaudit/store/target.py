"""Checks of a run directory before `kdaudit run` trains into it: that it can be written,
and that it does not hold another config's audit (whose report the new one would replace).

Both raise ConfigError with one line that names the path or the configs and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdaudit.config import ConfigError, ExperimentConfig, to_dict

# keys that change no run (run ids do not depend on them): a new value is the same audit
_NOT_IDENTITY = ("data_dir",)


def check_writable(out: str | Path, what: str = "run directory",
                   fix: str = "give --out a writable directory") -> None:  # fmt: skip
    """`out` is, or can be made, a writable directory; `what` names it and `fix` says what
    to do otherwise."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." or "/" at worst
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == out else f"lies under the file {existing}"
        raise ConfigError(f"{what} {out} {where}; give --out a directory (a new one, "
                          "or an earlier run directory to resume)")  # fmt: skip
    if not os.access(existing, os.W_OK | os.X_OK):
        shown = existing.absolute() if existing == Path() else existing  # not "."
        raise ConfigError(f"{what} {out}: {shown} is read-only; {fix}, or make it "
                          f"writable (chmod u+w {shown})")  # fmt: skip


def check_same_config(out: str | Path, cfg: ExperimentConfig, source: Any = None,
                      flags: tuple[str, str] = ("--out", "--force-new-config")) -> None:  # fmt: skip
    """`out` holds no complete run of another config. `source` names the new config (its
    file) in the message, `flags` the options that choose another directory or force it."""
    from kdaudit.store import RunStore

    store = RunStore(out)
    saved = store.root / "experiment.yaml"
    if not saved.is_file() or not any(store.runs.glob("*/record.json")):
        return
    changed = config_changes(store.load_experiment(), cfg)
    if changed:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        new = source if isinstance(source, str | Path) else "the config given"
        raise ConfigError(f"{out} holds the audit of another config ({saved}); {new} differs "
                          f"in {shown}{more}. Give another {flags[0]}, or {flags[1]} to run "
                          "it here (the old runs are kept, the report becomes this config's)")  # fmt: skip


def config_changes(old: ExperimentConfig, new: ExperimentConfig) -> dict[str, tuple]:
    """Dotted key -> (old value, new value) for every setting that differs."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    keys = [k for k in {**a, **b} if k.split(".")[0] not in _NOT_IDENTITY]
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
