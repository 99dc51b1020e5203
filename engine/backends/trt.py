"""TensorRT: a serialised plan of the maps graph on an NVIDIA GPU, then the scales' fusion in PyTorch on the GPU.

The plan ends at the per-scale NLL maps q0..qn, as the CPU backends' graph does: the fusion after it
(upsample, blur, weighted mean, top-k mean) runs here on the GPU from the header's ScoringSpec, so the
plan holds no TopK (TensorRT's is limited to k <= 3840, a 256² map's 10 % is 6554) and tiled frames get
the map their score reads. Written against the TensorRT 10 Python API and never run here: TensorRT cannot
be installed on our machines; tests/test_tensorrt.py runs this module against a fake TensorRT on the CPU
whose plan is the ONNX graph under ONNX Runtime, reading and writing the addresses bound here.

Every step of a call is on the backend's own stream (upload from pinned memory, execution, fusion,
download), each TensorRT call's result is checked, batches above the plan's profile maximum are split,
and calls are serialised by a lock: one execution context serves one call at a time.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numpy as np

from engine.backends import Backend, run_batched
from engine.backends.pinned import PinnedUpload
from engine.common.errors import RunError
from engine.format import EngineFileError
from engine.header import SECTION_TENSORRT_PLAN, EngineHeader
from engine.scoring import scoring_for

__all__ = ["TensorRTBackend", "DEVICE"]

DEVICE = "cuda"  # where the plan's tensors live; tests/test_tensorrt.py sets "cpu" for its fake TensorRT


class TensorRTBackend(Backend):
    """Not thread-safe by itself (one execution context and stream): calls are serialised by its lock."""

    thread_safe = False

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 busy_wait: bool = True, device: str | None = None):  # busy_wait: no such setting
        import tensorrt as trt
        import torch  # CUDA buffers; the CUDA path carries PyTorch anyway
        device = device or DEVICE
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineFileError("this engine was built for TensorRT, which needs an NVIDIA GPU; none is visible")
        if header.scoring is None:
            raise EngineFileError("this TensorRT engine has no scoring in its header: rebuild it")
        self.torch, self.device, self.size = torch, device, tuple(header.input_size)  # (H, W)
        self.shapes = header.scoring.shapes  # each output q_s is (B, h_s, w_s)
        self.scoring = scoring_for(header.scoring, "device", device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.plan = self.runtime.deserialize_cuda_engine(sections[SECTION_TENSORRT_PLAN])
        if self.plan is None:
            raise EngineFileError("TensorRT could not deserialise the plan (built with another TensorRT or GPU?)")
        self.context = self.plan.create_execution_context()
        if self.context is None:
            raise EngineFileError("TensorRT could not create an execution context for the plan (GPU memory?)")
        lowest, _, highest = self.plan.get_tensor_profile_shape("images", 0)  # the profile's (min, opt, max)
        self.max_batch, self.fixed_batch = int(highest[0]), int(lowest[0]) == int(highest[0])
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.upload = PinnedUpload(device)
        self.lock = threading.Lock()

    def _on_stream(self):
        return self.torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _maps(self, images: np.ndarray) -> tuple:
        """Upload, run the plan and fuse its maps, on the stream: device tensors (map, score map)."""
        torch = self.torch
        x = self.upload(images)  # from page-locked memory, on this stream
        q = [torch.empty((len(images), h, w), dtype=torch.float32, device=self.device) for h, w in self.shapes]
        if not self.context.set_input_shape("images", tuple(x.shape)):
            raise RunError(f"TensorRT refused input shape {tuple(x.shape)} (the plan's profile takes batches "
                           f"1-{self.max_batch} of {self.size[0]}x{self.size[1]})")
        self.bindings = {"images": x, **{f"q{i}": t for i, t in enumerate(q)}}  # kept alive until the next call
        for name, t in self.bindings.items():
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise RunError(f"TensorRT refused the address of tensor {name!r}")
        if not self.context.execute_async_v3(self.stream.cuda_stream if self.stream is not None else 0):
            raise RunError("TensorRT failed to run the plan (execute_async_v3 returned False)")
        return self.scoring.maps(q)

    def _download(self, *tensors) -> tuple[np.ndarray, ...]:
        out = tuple(t.to("cpu", non_blocking=False) for t in tensors)
        if self.stream is not None:
            self.stream.synchronize()
        return tuple(t.numpy() for t in out)

    def _infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._on_stream():
            amap, score_map = self._maps(images)
            return self._download(amap, self.scoring.scores(score_map))

    def _infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._on_stream():
            amap, score_map = self._maps(images)
            if score_map is amap:
                (amap,) = self._download(amap)
                return amap, amap
            return self._download(amap, score_map)

    def _locked(self, run, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if self.context is None:
                raise RunError("the TensorRT backend is closed")
            if len(images) <= self.max_batch:
                return run(images)
            return run_batched(run, images, self.max_batch, pad=self.fixed_batch)  # above the profile: in chunks

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._locked(self._infer, images)

    def infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._locked(self._infer_maps, images)

    def close(self) -> None:
        with self.lock:
            self.context = self.plan = None
            self.upload.close()
