"""ONNX Runtime: the engine's ONNX graph (to the per-scale maps), then the native fusion (engine/native.py)."""

from __future__ import annotations

import numpy as np

from engine.backends import Backend, default_threads
from engine.header import SECTION_ONNX, EngineHeader
from engine.scoring import scoring_for

__all__ = ["OnnxRuntimeBackend", "ORT_SPINNING"]

ORT_SPINNING = "session.intra_op.allow_spinning"  # the session option behind Backend's busy_wait


class OnnxRuntimeBackend(Backend):
    """Thread-safe: an InferenceSession runs concurrent calls, and the native fusion holds no state."""

    thread_safe = True

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 busy_wait: bool = True):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = default_threads(threads)
        if not busy_wait:
            opts.add_session_config_entry(ORT_SPINNING, "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(sections[SECTION_ONNX], opts, providers=providers)
        self.scoring = scoring_for(header.scoring, "native")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scoring(self.session.run(None, {"images": images}))

    def infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scoring.maps(self.session.run(None, {"images": images}))

    def close(self) -> None:
        self.session = None
