"""kdaudit: audit knowledge distillation with paired seeds, controls and functional similarity."""

__version__ = "0.1.0"
