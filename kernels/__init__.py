"""Fused Triton kernels and their PyTorch references (issue 4)."""
