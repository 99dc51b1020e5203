"""TensorRT: a serialised plan on an NVIDIA GPU (written against the TensorRT 10 Python API; never run here:
TensorRT cannot be installed on our machines). Buffers are torch CUDA tensors for now."""

from __future__ import annotations

import numpy as np

from engine.backends import Backend
from engine.format import EngineFileError
from engine.header import SECTION_TENSORRT_PLAN, EngineHeader

__all__ = ["TensorRTBackend"]


class TensorRTBackend(Backend):
    """Not thread-safe: one execution context and stream (engine.Engine serialises calls)."""

    thread_safe = False

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None):
        import tensorrt as trt
        import torch  # CUDA buffers; the CUDA path carries PyTorch anyway
        if not torch.cuda.is_available():
            raise EngineFileError("this engine was built for TensorRT, which needs an NVIDIA GPU; none is visible")
        self.torch, self.size = torch, tuple(header.input_size)  # (H, W)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.plan = self.runtime.deserialize_cuda_engine(sections[SECTION_TENSORRT_PLAN])
        if self.plan is None:
            raise EngineFileError("TensorRT could not deserialise the plan (built with another TensorRT or GPU?)")
        self.context = self.plan.create_execution_context()
        self.stream = torch.cuda.Stream()

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(images).cuda(non_blocking=True)
        amap = torch.empty((len(images), *self.size), dtype=torch.float32, device="cuda")  # (B, H, W)
        score = torch.empty((len(images),), dtype=torch.float32, device="cuda")
        self.context.set_input_shape("images", tuple(x.shape))
        for name, t in (("images", x), ("anomaly_map", amap), ("score", score)):
            self.context.set_tensor_address(name, t.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return amap.cpu().numpy(), score.cpu().numpy()

    def close(self) -> None:
        self.context = self.plan = None
