"""Training side of lineflow: the FastFlow + AltUB reference model, datasets, fit and evaluate."""

from train.checkpoint import load_model, save_model
from train.model import FastFlow, FlowConfig

__all__ = ["FastFlow", "FlowConfig", "load_model", "save_model"]
