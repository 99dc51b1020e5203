"""Training side of lineflow: the FastFlow + AltUB reference model, datasets, fit and evaluate.

Exports resolve lazily, so `train.images` and `train.cli` import without torch (the engine's
runtime reads images through them).
"""

from __future__ import annotations

__all__ = ["FastFlow", "FlowConfig", "load_model", "save_model"]


def __getattr__(name: str):
    if name in ("FastFlow", "FlowConfig"):
        from train import model
        return getattr(model, name)
    if name in ("load_model", "save_model"):
        from train import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
