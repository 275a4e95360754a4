"""kdaudit: audit knowledge distillation with paired seeds, controls and functional similarity."""

__version__ = "0.1.0"
__all__ = ["__version__", "audit"]


def __getattr__(name: str):
    # `kdaudit.audit` without importing torch and pandas on `import kdaudit` (the CLI's
    # light commands import the package too).
    if name == "audit":
        from kdaudit.api import audit

        return audit
    raise AttributeError(f"module 'kdaudit' has no attribute {name!r}")
