"""The build side: `python -m engine.build model.pt` (slow, once; imports torch and the model definition).

graph.py folds a trained model into its inference graph; export.py turns it into ONNX or a TensorRT
plan, kernel_pack.py into the CUDA path's kernels section; builder.py checks each candidate against
the PyTorch reference and writes the engine file.
The run side (engine.load, engine.run) never imports this package.
"""

from __future__ import annotations

from engine.builder.builder import BuildConfig, build_engine
from engine.builder.export import export_onnx

__all__ = ["BuildConfig", "build_engine", "export_onnx"]
