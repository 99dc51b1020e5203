"""Runtime backends behind one interface: built once by engine.build, loaded here to run many times.

A backend takes (B, 3, S, S) float32 images in [0, 1] and returns the anomaly maps (B, S, S) and the
image scores (B,). Each loader imports only its own runtime, and only when asked for it.

- onnxruntime: the ONNX graph, CPU (or CUDA where onnxruntime-gpu is installed).
- openvino: the same ONNX graph compiled by OpenVINO for this CPU, at the precision the build chose; at
  precision "bf16-flow" as two graphs, the backbone in fp32 and the flow in bf16 (STAGE_PRECISIONS).
- tensorrt: a serialised TensorRT plan (NVIDIA GPUs; written against the TensorRT 10 Python API; not
  run here: TensorRT cannot be installed on our machines).
- torch: rebuilt from the model.pt bytes the engine carries. On the CPU the PyTorch reference itself;
  on a CUDA device the backbone in cuDNN (channels-last, autocast to the engine's precision), the flow
  and scoring in the fused Triton kernels (engine/gpu_head.py), each batch size one CUDA graph.
"""

from __future__ import annotations

import importlib.util
import io
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.format import EngineFileError

__all__ = ["Backend", "BACKENDS", "STAGE_PRECISIONS", "available_backends", "load_backend"]

Backend = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

BACKENDS = ("openvino", "onnxruntime", "tensorrt", "torch")
_MODULE = {"openvino": "openvino", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch"}


def available_backends() -> list[str]:
    """Backends whose runtime is installed here (TensorRT also needs a CUDA device to run)."""
    return [b for b in BACKENDS if importlib.util.find_spec(_MODULE[b]) is not None]


def _threads(threads: int | None) -> int:
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fused(header: dict, run_graph: Callable[[np.ndarray], list[np.ndarray]]) -> Backend:
    """A graph ending at per-scale maps (header["scoring"]) + the native fusion -> the Backend interface."""
    if "scoring" not in header:
        return lambda images: tuple(run_graph(images)[:2])
    from engine.native import NativeScoring
    scoring = NativeScoring(header["scoring"])
    return lambda images: scoring(run_graph(images))


def _onnxruntime(header: dict, sections: dict[str, bytes], threads: int | None) -> Backend:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(sections["onnx"], opts, providers=providers)
    return _fused(header, lambda images: session.run(None, {"images": images}))


OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# precisions that run the graph as two stages: (backbone, flow); the engine then carries "onnx_backbone" and
# "onnx_flow" (engine.graph.BackboneGraph / FlowGraph) instead of one "onnx" graph
STAGE_PRECISIONS = {"bf16-flow": ("fp32", "bf16")}


def _openvino(header: dict, sections: dict[str, bytes], threads: int | None) -> Backend:
    """Frames go through batch-1 graphs with static shapes, one frame per infer request.

    On the default model (bf16-flow, this 2-core CPU) a dynamic batch dimension took 44 ms a frame against 20 ms
    static, and static batch 8 was slower per frame than batch 1. A single frame runs on one stream with all
    threads (latency); a batch is spread over OpenVINO's throughput streams (here 2 of 1 thread each: the flow's
    small convolutions do not scale across threads, so two frames at once gave 1.2-1.5x the frames/s).
    """
    import openvino as ov
    precision = header.get("precision")
    if precision in STAGE_PRECISIONS:
        stages = list(zip((sections["onnx_backbone"], sections["onnx_flow"]), STAGE_PRECISIONS[precision]))
    elif precision in OPENVINO_PRECISION:
        stages = [(sections["onnx"], precision)]
    else:
        raise EngineFileError(f"unknown OpenVINO precision {precision!r} in the engine header")
    core = ov.Core()
    n_threads = _threads(threads)

    def compiled(hint: str) -> list:
        out = []
        for onnx, p in stages:
            model = core.read_model(onnx, b"")
            model.reshape({i.get_any_name(): ov.PartialShape([1, *list(i.get_partial_shape())[1:]])
                           for i in model.inputs})
            out.append(core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": n_threads, "PERFORMANCE_HINT": hint,
                                                         "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[p]}))
        return out

    def frame_runner(graphs: list) -> Callable[[np.ndarray], list[np.ndarray]]:
        requests = [g.create_infer_request() for g in graphs]

        def run_frame(image: np.ndarray) -> list[np.ndarray]:
            values = [image]
            for g, request in zip(graphs, requests):  # each stage's outputs are the next one's inputs
                out = request.infer(dict(enumerate(values)))
                values = [out[o] for o in g.outputs]
            return [np.array(v) for v in values]
        return run_frame

    latency = frame_runner(compiled("LATENCY"))
    streams: list = []  # built on the first batch: (thread pool, one frame runner per stream)
    lock = threading.Lock()  # an infer request is not thread-safe: one engine used from several threads queues

    def run(images: np.ndarray) -> list[np.ndarray]:
        with lock:
            if len(images) == 1:
                return latency(images)
            if not streams:
                graphs = compiled("THROUGHPUT")
                n = max(1, int(graphs[0].get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
                streams.extend([ThreadPoolExecutor(n, thread_name_prefix="lineflow-openvino"),
                                [frame_runner(graphs) for _ in range(n)]])
            pool, runners = streams
            n = len(runners)
            parts = pool.map(lambda k: [runners[k](images[i:i + 1]) for i in range(k, len(images), n)], range(n))
            per_frame: list = [None] * len(images)
            for k, outs in enumerate(parts):
                per_frame[k::n] = outs
            return [np.concatenate(maps) for maps in zip(*per_frame)]
    return _fused(header, run)


def _tensorrt(header: dict, sections: dict[str, bytes], threads: int | None) -> Backend:
    import tensorrt as trt
    import torch  # CUDA buffers; the CUDA path carries PyTorch anyway
    if not torch.cuda.is_available():
        raise EngineFileError("this engine was built for TensorRT, which needs an NVIDIA GPU; none is visible")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    plan = runtime.deserialize_cuda_engine(sections["tensorrt_plan"])
    if plan is None:
        raise EngineFileError("TensorRT could not deserialise the plan (built with another TensorRT or GPU?)")
    context = plan.create_execution_context()
    stream = torch.cuda.Stream()
    size = header["input_size"]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(images).cuda(non_blocking=True)
        amap = torch.empty((len(images), size, size), dtype=torch.float32, device="cuda")
        score = torch.empty((len(images),), dtype=torch.float32, device="cuda")
        context.set_input_shape("images", tuple(x.shape))
        for name, t in (("images", x), ("anomaly_map", amap), ("score", score)):
            context.set_tensor_address(name, t.data_ptr())
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return amap.cpu().numpy(), score.cpu().numpy()
    return run


def _torch(header: dict, sections: dict[str, bytes], threads: int | None) -> Backend:
    import torch

    from train.checkpoint import load_model_bytes
    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model_bytes(io.BytesIO(sections["model"]), "engine's model section")
    if not torch.cuda.is_available():
        model = model.eval()

        def run_cpu(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                amap, score = model(torch.from_numpy(images))
            return amap.numpy(), score.numpy()
        return run_cpu
    # CUDA: backbone in cuDNN, flow and scoring in the Triton kernels, one CUDA graph per batch size
    from engine.gpu_head import CudaGraphRunner, KernelGraph
    from engine.graph import InferenceGraph
    kernel_graph = KernelGraph(InferenceGraph(model.eval()), header.get("precision", "fp32")).cuda().eval()
    runner = CudaGraphRunner(kernel_graph)

    def run_cuda(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = runner(torch.from_numpy(images).cuda(non_blocking=True))
        return amap.cpu().numpy(), score.cpu().numpy()  # copies: the graph's outputs are reused by the next call
    return run_cuda


_LOADERS = {"onnxruntime": _onnxruntime, "openvino": _openvino, "tensorrt": _tensorrt, "torch": _torch}


def load_backend(header: dict, sections: dict[str, bytes], threads: int | None = None) -> Backend:
    name = header.get("backend")
    if name not in _LOADERS:
        raise EngineFileError(f"unknown backend {name!r} in the engine header")
    if importlib.util.find_spec(_MODULE[name]) is None:
        raise EngineFileError(f"this engine was built for {name}, which is not installed here "
                              f"(installed: {', '.join(available_backends()) or 'none'}); "
                              f"install it or rebuild with --backend {'/'.join(available_backends()) or '...'}")
    needed = {"tensorrt": ["tensorrt_plan"], "torch": ["model"]}.get(name) or (
        ["onnx_backbone", "onnx_flow"] if header.get("precision") in STAGE_PRECISIONS else ["onnx"])
    missing = [s for s in needed if s not in sections]
    if missing:
        raise EngineFileError(f"this {name} engine lacks its section {', '.join(missing)}; rebuild it")
    return _LOADERS[name](header, sections, threads)
