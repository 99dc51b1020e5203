"""The torch backend: the model rebuilt from the model.pt bytes the engine carries.

On a CPU it is the PyTorch reference itself (what the other backends are checked against); on a
CUDA device the backbone runs in cuDNN (channels-last, autocast to the engine's precision) and the
flow and scoring in the fused Triton kernels (engine/backends/cuda.py) from the engine's kernels
section and its header's scoring, one CUDA graph per batch size. The one run-side module that imports
training's model definition (to rebuild the backbone), lazily, here only.
"""

from __future__ import annotations

import io
from functools import partial

import numpy as np

from engine.backends import Backend
from engine.format import EngineFileError
from engine.header import SECTION_KERNELS, SECTION_MODEL, EngineHeader

__all__ = ["TorchBackend", "flow_inputs"]


def flow_inputs(model, precision: str):
    """The CUDA path's feature module of a FastFlow model: its backbone, then its neighbourhood pool."""
    from engine.backends.cuda import FlowInputs
    from train.model import pool_features
    return FlowInputs(model.backbone, partial(pool_features, k=model.config.feature_pool,
                                              pooled=model.pooled_scales()), precision)


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
        if header.scoring is None or SECTION_KERNELS not in sections:
            raise EngineFileError("this torch engine was built before engine format 8 and carries no kernels section "
                                  "for the CUDA path: rebuild it with python -m engine.build (on a CPU it still runs "
                                  "as the PyTorch reference)")
        from engine.backends.cuda import CudaGraphRunner, KernelGraph, read_kernel_section
        from engine.backends.pinned import PinnedUpload
        tensors = read_kernel_section(sections[SECTION_KERNELS])
        self.upload = PinnedUpload("cuda")  # calls are serialised by engine.Engine on CUDA (thread_safe False)
        self.kernel_graph = KernelGraph(tensors, header.scoring, flow_inputs(model.eval(), header.precision),
                                        header.precision).cuda().eval()
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
