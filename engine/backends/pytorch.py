"""The torch backend: the model rebuilt from the model.pt bytes the engine carries.

On a CPU it is the PyTorch reference itself (what the other backends are checked against); on a
CUDA device the backbone runs in cuDNN (channels-last, autocast to the engine's precision) and the
flow and scoring in the fused Triton kernels (engine/backends/cuda.py), one CUDA graph per batch
size. The one run-side module that imports training's model definition, lazily, here only.
"""

from __future__ import annotations

import io

import numpy as np

from engine.backends import Backend
from engine.header import SECTION_MODEL, EngineHeader

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """Thread-safe on the CPU (a forward pass without autograd holds no state); on CUDA the captured graphs'
    static buffers are shared, so calls are serialised by engine.Engine."""

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 busy_wait: bool = True):  # busy_wait: this runtime has no such setting
        import torch

        from train.checkpoint import load_model_bytes
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        model, _ = load_model_bytes(io.BytesIO(sections[SECTION_MODEL]), "engine's model section")
        self.cuda = torch.cuda.is_available()
        self.thread_safe = not self.cuda
        if not self.cuda:
            self.model = model.eval()
            return
        from engine.backends.cuda import CudaGraphRunner, KernelGraph
        from engine.backends.pinned import PinnedUpload
        from engine.builder.graph import InferenceGraph
        self.upload = PinnedUpload("cuda")  # calls are serialised by engine.Engine on CUDA (thread_safe False)
        self.kernel_graph = KernelGraph(InferenceGraph(model.eval()), header.precision).cuda().eval()
        self.model = CudaGraphRunner(self.kernel_graph)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        if not self.cuda:
            with torch.no_grad():
                amap, score = self.model(torch.from_numpy(images))
            return amap.numpy(), score.numpy()
        amap, score = self.model(self.upload(images))
        return amap.cpu().numpy(), score.cpu().numpy()  # copies: the graph's outputs are reused by the next call

    def infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            if not self.cuda:
                zs, _ = self.model.flow(self.model.features(torch.from_numpy(images)))
                amap, score_map = self.model.score_maps(zs, self.model.config.input_size)
            else:  # eagerly, outside the captured graphs (which end at the score)
                amap, score_map = self.kernel_graph.maps(self.upload(images))
        return amap.cpu().numpy(), (amap if score_map is amap else score_map).cpu().numpy()

    def close(self) -> None:
        self.model = self.kernel_graph = None
        if self.cuda:
            self.upload.close()
