"""Uploads through page-locked host memory: the one host-to-device copy a CUDA backend makes per call.

A copy from pageable memory is synchronous (CUDA stages it through a pinned bounce buffer itself); from
a pinned buffer it is a DMA that runs on the caller's stream while the CPU goes on. The buffer grows to
the largest batch seen and is reused: callers hold their own lock (one call at a time per buffer) and wait
for their stream before the next call (both CUDA backends do: they copy the results back synchronously).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PinnedUpload"]


class PinnedUpload:
    def __init__(self, device: str):
        import torch
        self.torch, self.device, self.buffer = torch, device, None

    def __call__(self, images: np.ndarray):
        """(B, 3, H, W) float32 -> the same on the device, copied on the current stream (asynchronously on CUDA)."""
        torch = self.torch
        if not str(self.device).startswith("cuda"):
            return torch.from_numpy(images).to(self.device)
        if self.buffer is None or self.buffer.numel() < images.size:
            self.buffer = torch.empty(images.size, dtype=torch.float32, pin_memory=True)
        host = self.buffer[:images.size].view(images.shape)
        host.numpy()[...] = images
        return host.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.buffer = None
