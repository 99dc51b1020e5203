"""Runtime backends behind one small interface: built once by engine.build, loaded here to run many times.

A backend is loaded by its constructor from the engine's header and sections, takes (B, 3, H, W)
float32 images in [0, 1] in `infer` and returns the anomaly maps (B, H, W) and the image scores (B,)
(`infer_maps`: the maps and the maps the scores read, for tiled frames),
and lets go of its threads and buffers in `close`. Each module imports only its own runtime, and
only when an engine asks for it:

- onnxruntime (ort.py): the ONNX graph, CPU (or CUDA where onnxruntime-gpu is installed).
- openvino (ov.py): the same graph compiled by OpenVINO for this CPU, at the precision the build chose.
- tensorrt (trt.py): a serialised TensorRT plan (NVIDIA GPUs; never run here: TensorRT cannot be installed).
- torch (pytorch.py): the model rebuilt from the model.pt bytes the engine carries: the PyTorch
  reference on a CPU, the CUDA path with the fused Triton kernels (cuda.py) on a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

import numpy as np

from engine.format import EngineFileError
from engine.header import BACKENDS, EngineHeader

__all__ = ["Backend", "BACKENDS", "available_backends", "load_backend", "run_batched", "default_threads"]

# backend -> (the package it runs on, module:class here)
_REGISTRY = {"onnxruntime": ("onnxruntime", "engine.backends.ort:OnnxRuntimeBackend"),
             "openvino": ("openvino", "engine.backends.ov:OpenVinoBackend"),
             "tensorrt": ("tensorrt", "engine.backends.trt:TensorRTBackend"),
             "torch": ("torch", "engine.backends.pytorch:TorchBackend")}
assert set(_REGISTRY) == set(BACKENDS)


class Backend:
    """The interface. `thread_safe` False: `infer` must not run in two threads at once (engine.Engine locks)."""

    thread_safe: bool = True

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 busy_wait: bool = True):
        """`busy_wait` False: the runtime's worker threads sleep between calls instead of spinning. ONNX Runtime's
        spin makes its own calls a little faster but holds the cores after each call, which slows the next engine
        called in the same process (benchmarks/NOTES.md, "Several engines in one process: busy_wait"), so a process
        with several engines turns it off; runtimes without such a setting ignore it."""
        raise NotImplementedError

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 -> (maps (B, H, W) float32, scores (B,) float32)."""
        raise NotImplementedError

    def infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 -> (maps (B, H, W), score maps (B, H, W)): the map the image score reads (the same
        array when it reads the map's scales), for frames cut in tiles, whose score is read after stitching."""
        raise EngineFileError(f"{type(self).__name__} cannot run a tiling engine")

    def close(self) -> None:
        """Stop the backend's own threads and free its buffers; idempotent."""


def default_threads(threads: int | None) -> int:
    """`threads`, or all the cores this process may use."""
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_backends() -> list[str]:
    """Backends whose runtime is installed here (TensorRT also needs a CUDA device to run)."""
    return [b for b in BACKENDS if importlib.util.find_spec(_REGISTRY[b][0]) is not None]


def load_backend(header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 busy_wait: bool = True) -> Backend:
    """The engine's backend, loaded; EngineFileError when its runtime is missing here or a section is."""
    package, where = _REGISTRY[header.backend]
    if importlib.util.find_spec(package) is None:
        installed = available_backends()
        raise EngineFileError(f"this engine was built for {header.backend}, which is not installed here "
                              f"(installed: {', '.join(installed) or 'none'}); "
                              f"install it or rebuild with --backend {'/'.join(installed) or '...'}")
    missing = [s for s in header.needed_sections if s not in sections]
    if missing:
        raise EngineFileError(f"this {header.backend} engine lacks its section {', '.join(missing)}; rebuild it")
    module, cls = where.split(":")
    return getattr(importlib.import_module(module), cls)(header, sections, threads, busy_wait=busy_wait)


def run_batched(infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], images: np.ndarray,
                batch: int | None, pad: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """infer over `images` in chunks of `batch` (None: one call); with `pad` (a fixed-batch engine) the last chunk
    is padded with copies of its last image, whose results are dropped."""
    step = batch or len(images)
    maps, scores = [], []
    for i in range(0, len(images), step):
        chunk = images[i:i + step]
        n = len(chunk)
        if pad and n < step:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
        amap, score = infer(np.ascontiguousarray(chunk))
        maps.append(amap[:n])
        scores.append(score[:n])
    return np.concatenate(maps), np.concatenate(scores)
