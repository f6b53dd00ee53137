"""erde: early-exit image classifiers and entropy-regularized distillation (ERDE)."""

__version__ = "0.1.0"
