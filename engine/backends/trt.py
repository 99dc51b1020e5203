"""TensorRT: a serialised plan on an NVIDIA GPU (written against the TensorRT 10 Python API; never run here:
TensorRT cannot be installed on our machines; tests/test_exits.py runs it against a fake TensorRT on the CPU).

Every step of a call is on the backend's own stream (upload, execution, download), each TensorRT call's
result is checked, batches above the plan's profile maximum are split, and calls are serialised by a lock:
one execution context serves one call at a time.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numpy as np

from engine.backends import Backend, run_batched
from engine.common.errors import RunError
from engine.format import EngineFileError
from engine.header import SECTION_TENSORRT_PLAN, EngineHeader

__all__ = ["TensorRTBackend"]


class TensorRTBackend(Backend):
    """Not thread-safe by itself (one execution context and stream): calls are serialised by its lock."""

    thread_safe = False

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 device: str = "cuda"):
        import tensorrt as trt
        import torch  # CUDA buffers; the CUDA path carries PyTorch anyway
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineFileError("this engine was built for TensorRT, which needs an NVIDIA GPU; none is visible")
        self.torch, self.device, self.size = torch, device, tuple(header.input_size)  # (H, W)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.plan = self.runtime.deserialize_cuda_engine(sections[SECTION_TENSORRT_PLAN])
        if self.plan is None:
            raise EngineFileError("TensorRT could not deserialise the plan (built with another TensorRT or GPU?)")
        self.context = self.plan.create_execution_context()
        if self.context is None:
            raise EngineFileError("TensorRT could not create an execution context for the plan (GPU memory?)")
        self.max_batch = int(self.plan.get_tensor_profile_shape("images", 0)[2][0])  # the profile's (min, opt, max)
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.lock = threading.Lock()

    def _on_stream(self):
        return self.torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with self._on_stream():  # upload, run and download on this stream, in order: no cross-stream race
            x = torch.from_numpy(images).to(self.device, non_blocking=True)
            amap = torch.empty((len(images), *self.size), dtype=torch.float32, device=self.device)  # (B, H, W)
            score = torch.empty((len(images),), dtype=torch.float32, device=self.device)
            if not self.context.set_input_shape("images", tuple(x.shape)):
                raise RunError(f"TensorRT refused input shape {tuple(x.shape)} (the plan's profile takes batches "
                               f"1-{self.max_batch} of {self.size[0]}x{self.size[1]})")
            self.bindings = {"images": x, "anomaly_map": amap, "score": score}
            for name, t in self.bindings.items():
                if not self.context.set_tensor_address(name, t.data_ptr()):
                    raise RunError(f"TensorRT refused the address of tensor {name!r}")
            if not self.context.execute_async_v3(self.stream.cuda_stream if self.stream is not None else 0):
                raise RunError("TensorRT failed to run the plan (execute_async_v3 returned False)")
            out = amap.to("cpu", non_blocking=False), score.to("cpu", non_blocking=False)
        if self.stream is not None:
            self.stream.synchronize()
        return out[0].numpy(), out[1].numpy()

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if self.context is None:
                raise RunError("the TensorRT backend is closed")
            if len(images) <= self.max_batch:
                return self._run(images)
            return run_batched(self._run, images, self.max_batch)  # above the profile: in profile-sized chunks

    def close(self) -> None:
        with self.lock:
            self.context = self.plan = None

