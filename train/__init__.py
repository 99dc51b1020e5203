"""Training side of lineflow: the FastFlow + AltUB reference model, backbones, datasets, fit, evaluate, demo.

Imports torch. Shares errors, image decoding, atomic writes and the common maths with the engine
through engine.common; the engine's run side never imports this package (its torch backend
excepted, which rebuilds the model from the engine's model.pt bytes).
"""

from __future__ import annotations

from train.checkpoint import load_model, save_model
from train.model import FastFlow, FlowConfig

__all__ = ["FastFlow", "FlowConfig", "load_model", "save_model"]
