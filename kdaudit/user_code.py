"""User code in an audit: functions named `package.module:function` in a config, and Python
objects handed to `kdaudit.audit()` in this process.

Named functions are imported wherever a run executes (worker processes and Ray tasks
included). Objects passed in memory cannot travel: they are kept in a process-local table
under a fingerprint that also names them in the run config, so run ids stay stable across
calls and a rerun with the same objects resumes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from kdaudit.errors import UserCodeError

# package.module:function, the function possibly nested (Class.method)
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_reference(ref: Any) -> None:
    """Syntax only (no import): raises ValueError, which config loading prefixes with the key."""
    if not isinstance(ref, str) or not _REFERENCE.match(ref):
        raise ValueError(
            f"factory {ref!r} is not of the form 'package.module:function'; "
            'write e.g. factory: "mymodels.nets:make_student"'
        )


def check_factory(cfg: Any) -> None:
    """A factory config's `factory` and `kwargs` (raises ValueError, prefixed with the key)."""
    check_reference(cfg.factory)
    check_kwargs(cfg.kwargs)


def check_kwargs(kwargs: Any) -> None:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"kwargs must be a mapping of argument names to values, got {kwargs!r}")


def import_callable(ref: str, key: str) -> Callable:
    """The function `ref` ('package.module:function') names; `key` is the config key."""
    check_reference(ref)
    module_name, _, attr = ref.partition(":")
    # The working directory, as `python -m` would have it: a console script's sys.path[0]
    # is its bin/ folder, so `kdaudit run` could not see the user's own modules otherwise.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:
        raise UserCodeError(
            f"{key}: cannot import module {module_name!r} ({type(err).__name__}: {err}); install "
            "it, or run kdaudit from the folder that holds it, or add that folder to PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserCodeError(f"{key}: {module_name!r} has no attribute {attr!r}; "
                                f"check the name after the ':' in {ref!r}")  # fmt: skip
        obj = getattr(obj, part)
    if not callable(obj):
        kind = type(obj).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserCodeError(f"{key}: {ref!r} is not callable ({article} {kind}); "
                            "point it at a function that builds the object")  # fmt: skip
    return obj


def reference_of(obj: Any) -> str:
    """'module:qualname' of a function or class (a readable name, not always importable)."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def frozen(kwargs: dict) -> str:
    """A hashable view of factory kwargs (plain YAML data) for frozen config classes."""
    return json.dumps(kwargs, sort_keys=True, default=repr)


# ---------------------------------------------------------------- objects passed in memory

_OBJECTS: dict[tuple[str, str], Any] = {}  # (kind, fingerprint) -> object; lives with the process


def remember(kind: str, fingerprint: str, obj: Any) -> None:
    _OBJECTS[(kind, fingerprint)] = obj


def recall(kind: str, fingerprint: str) -> Any:
    if (kind, fingerprint) not in _OBJECTS:
        raise UserCodeError(
            f"{kind}: the in-memory {kind} {fingerprint[:12]} was passed to kdaudit.audit() in "
            "another process; only that process can use it. Call kdaudit.audit() again with "
            "the same objects to resume, or name them in a config (factory: "
            "'package.module:function') for `kdaudit run`, worker processes and Ray"
        )
    return _OBJECTS[(kind, fingerprint)]
