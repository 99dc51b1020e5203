"""OpenVINO on the CPU: the engine's ONNX graph(s) compiled at the precision the build chose, then the
native fusion (engine/native.py). At precisions "bf16-flow" and "bf16-deep" the graph runs as two stages,
the first in fp32 and the second in bf16 (engine.header.STAGE_PRECISIONS)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.backends import Backend, default_threads
from engine.header import SECTION_ONNX, STAGE_PRECISIONS, EngineHeader
from engine.scoring import scoring_for

__all__ = ["OpenVinoBackend", "OPENVINO_PRECISION", "compile_config"]

# INFERENCE_PRECISION_HINT; int8 graphs carry their int8 parts as quantize/dequantize pairs, the rest runs fp32
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32", "int8-backbone": "f32"}


def compile_config(threads: int, precision: str, hint: str = "LATENCY", **extra) -> dict:
    """How the engine compiles a graph for the CPU (benchmarks and profiling scripts compile the same way)."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint,
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision], **extra}


class OpenVinoBackend(Backend):
    """Frames go through batch-1 graphs with static shapes, one frame per infer request.

    A dynamic batch dimension made OpenVINO's call about twice its graphs' own time, and a static batch of 8 was
    no faster per frame than batch 1 (benchmarks/NOTES.md, "The CPU engine toward its floor", items 3-4). A single
    frame runs on one stream with all threads (latency); a batch is spread over OpenVINO's throughput streams,
    one thread each, because the flow's small convolutions do not scale across threads (same section, item 4).

    Not thread-safe: an infer request serves one call at a time (engine.Engine serialises calls).
    """

    thread_safe = False

    def __init__(self, header: EngineHeader, sections: dict[str, bytes], threads: int | None = None,
                 busy_wait: bool = True):  # busy_wait: this runtime has no such setting
        import openvino as ov
        if header.precision in STAGE_PRECISIONS:
            self.stages = [(sections[name], precision) for name, precision in STAGE_PRECISIONS[header.precision]]
        else:
            self.stages = [(sections[SECTION_ONNX], header.precision)]
        self.ov, self.core, self.threads = ov, ov.Core(), default_threads(threads)
        self.latency = self._frame_runner(self._compile("LATENCY"))
        self._warm_up(header)
        self.pool: ThreadPoolExecutor | None = None  # throughput streams, made on the first batch
        self.runners: list = []
        self.scoring = scoring_for(header.scoring, "native")

    def _compile(self, hint: str) -> list:
        graphs = []
        for onnx, precision in self.stages:
            model = self.core.read_model(onnx, b"")
            model.reshape({i.get_any_name(): self.ov.PartialShape([1, *list(i.get_partial_shape())[1:]])
                           for i in model.inputs})
            graphs.append(self.core.compile_model(model, "CPU", compile_config(self.threads, precision, hint)))
        return graphs

    def _warm_up(self, header: EngineHeader) -> None:
        """One frame through, in this thread, before any pool thread: OpenVINO's Python binding initialises its
        numpy glue on first use, and two threads doing that at once deadlocked a build here (one holding the GIL
        in a C++ static initialiser, the other holding the initialiser and waiting for the GIL)."""
        self.latency(np.zeros((1, 3, *header.input_size), np.float32))

    @staticmethod
    def _frame_runner(graphs: list):
        requests = [g.create_infer_request() for g in graphs]

        def run_frame(image: np.ndarray) -> list[np.ndarray]:
            values = [image]
            for g, request in zip(graphs, requests):  # each stage's outputs are the next one's inputs
                out = request.infer(dict(enumerate(values)))
                values = [out[o] for o in g.outputs]
            return [np.array(v) for v in values]
        return run_frame

    def _graph_outputs(self, images: np.ndarray) -> list[np.ndarray]:
        if len(images) == 1:
            return self.latency(images)
        if self.pool is None:
            graphs = self._compile("THROUGHPUT")
            n = max(1, int(graphs[0].get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self.runners = [self._frame_runner(graphs) for _ in range(n)]
            for run in self.runners:  # first calls in this thread, one at a time (see _warm_up)
                run(images[:1])
            self.pool = ThreadPoolExecutor(n, thread_name_prefix="lineflow-openvino")
        n = len(self.runners)
        parts = self.pool.map(lambda k: [self.runners[k](images[i:i + 1]) for i in range(k, len(images), n)],
                              range(n))
        per_frame: list = [None] * len(images)
        for k, outs in enumerate(parts):
            per_frame[k::n] = outs
        return [np.concatenate(maps) for maps in zip(*per_frame)]

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scoring(self._graph_outputs(images))

    def infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scoring.maps(self._graph_outputs(images))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.runners, self.latency = [], None
