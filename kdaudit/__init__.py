"""kdaudit: audit knowledge distillation with paired seeds, controls and functional similarity."""

__version__ = "0.1.0"
__all__ = ["__version__", "audit", "plan"]


def __getattr__(name: str):
    # `kdaudit.audit` without importing torch and pandas on `import kdaudit` (the CLI's
    # light commands import the package too).
    if name in ("audit", "plan"):
        from kdaudit import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdaudit' has no attribute {name!r}")
