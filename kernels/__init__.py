"""Fused Triton kernels (coupling.py, scoring.py) and their PyTorch references (reference.py)."""
