"""The compilers of the build side: the inference graph as ONNX (opset 17), ONNX as a TensorRT plan."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from engine.builder.graph import BackboneGraph, FlowGraph, HeadGraph, InferenceGraph, ScaleMapsGraph, TailFlowGraph
from engine.builder.kernel_pack import kernel_section
from engine.builder.quantize import KEEP_FP32, quantize_int8
from engine.builder.tensorrt_limits import tensorrt_graph_problems
from engine.common.errors import UserError
from engine.header import (
    SECTION_KERNELS,
    SECTION_MODEL,
    SECTION_ONNX,
    SECTION_ONNX_BACKBONE,
    SECTION_ONNX_FLOW,
    SECTION_ONNX_HEAD,
    SECTION_ONNX_TAIL,
    SECTION_TENSORRT_PLAN,
    STAGE_PRECISIONS,
    required_sections,
)

__all__ = ["export_onnx", "tensorrt_plan", "engine_sections", "ONNX_PARTS", "TENSORRT_MAX_BATCH"]

ONNX_PARTS = ("full", "maps", "backbone", "flow", "head", "tail")


def export_onnx(graph: InferenceGraph, batch: int | None, part: str = "full") -> bytes:
    """The inference graph, or a part of it, as ONNX (opset 17); batch None = dynamic batch dimension.

    full: images -> anomaly_map (B, H, W) and score (B,), the whole model in one graph (for users' own runtimes;
    its TopK takes 10 % of the map's pixels, beyond TensorRT's k <= 3840). maps: images -> the per-scale NLL
    maps q0..qn (B, h, w), fused after the graph by the header's scoring (every backend but torch; TensorRT's
    plan is built from it). backbone + flow: maps in two graphs, images -> features f0..fn -> q0..qn, for
    engines that run the two at different precisions. head + tail: maps in two graphs cut after the backbone's
    stride-4 map, images -> s4 -> q0..qn (bf16-deep: the head in fp32).
    """
    if part not in ONNX_PARTS:
        raise ValueError(f"part must be one of {ONNX_PARTS}, not {part!r}")
    n = len(graph.scales)
    x = torch.rand(batch or 2, 3, *graph.size)
    feats, maps = [f"f{i}" for i in range(n)], [f"q{i}" for i in range(n)]
    if part == "flow":
        with torch.no_grad():
            module, args, inputs, outputs = FlowGraph(graph), tuple(graph.features(x)), feats, maps
    elif part == "tail":
        with torch.no_grad():
            module, args, inputs, outputs = TailFlowGraph(graph), (graph.backbone.head(x),), ["s4"], maps
    else:
        module, outputs = {"full": (graph, ["anomaly_map", "score"]), "maps": (ScaleMapsGraph(graph), maps),
                           "backbone": (BackboneGraph(graph), feats), "head": (HeadGraph(graph), ["s4"])}[part]
        args, inputs = (x,), ["images"]
    dynamic = None if batch else {name: {0: "batch"} for name in [*inputs, *outputs]}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: sizes are fixed on purpose
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)
    return _static_output_shapes(buf.getvalue(), batch)


def _static_output_shapes(data: bytes, batch: int | None) -> bytes:
    """The graph with its outputs' shapes stated: (batch, ...) with the rest as ONNX's shape inference (with value
    propagation) finds them. The exporter leaves symbolic sizes where a pad's amounts pass through shape
    arithmetic, though the graph is built for one input size; TensorRT and the static check
    (engine/builder/tensorrt_limits.py) read the batch as the one dynamic dimension."""
    model = onnx.load_from_string(data)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, data_prop=True).graph.output}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for d, found in zip(dims[1:], inferred[value.name].type.tensor_type.shape.dim[1:]):
            if found.HasField("dim_value"):
                d.dim_value = found.dim_value
        if batch:
            dims[0].dim_value = batch
        else:
            dims[0].dim_param = "batch"
    return model.SerializeToString()


TENSORRT_MAX_BATCH = 128  # the largest batch a plan built for any batch takes (its optimisation profile's max)


def tensorrt_plan(onnx: bytes, precision: str, batch: int | None, hw: tuple[int, int],
                  max_batch: int = TENSORRT_MAX_BATCH) -> bytes:
    """The maps graph (ONNX) -> serialised TensorRT plan (TensorRT 10 Python API). TensorRT cannot be installed on
    our machines: tests/test_tensorrt.py checks the graph against its limits and runs this against a fake."""
    problems = tensorrt_graph_problems(onnx)
    if problems:
        raise UserError(f"the graph exceeds TensorRT's limits ({len(problems)} problems; first: "
                        f"{'; '.join(problems[:3])})")
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    lo, hi = (batch, batch) if batch else (1, max_batch)
    profile.set_shape("images", (lo, 3, *hw), (hi if batch else 8, 3, *hw), (hi, 3, *hw))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see its log above)")
    return bytes(plan)


def engine_sections(backend: str, precision: str, model_bytes: bytes, graph: InferenceGraph, batch: int | None,
                    exported: dict[str, bytes], check_images: np.ndarray | None = None) -> dict[str, bytes]:
    """The sections an engine of this backend and precision carries (engine.header.required_sections).
    `exported`: ONNX parts already exported, by part; filled here, so a part is exported once per build.
    `check_images`: real images (N, 3, H, W) that the int8 precisions take their ranges from."""

    def onnx(part: str) -> bytes:
        if part not in exported:
            exported[part] = export_onnx(graph, batch, part)
        return exported[part]
    make = {SECTION_MODEL: lambda: model_bytes,
            SECTION_KERNELS: lambda: kernel_section(graph),
            SECTION_TENSORRT_PLAN: lambda: tensorrt_plan(onnx("maps"), precision, batch, graph.size),
            SECTION_ONNX: lambda: (quantize_int8(onnx("maps"), precision, check_images) if precision in KEEP_FP32
                                   else onnx("maps")),  # the graph ends at the per-scale maps
            SECTION_ONNX_BACKBONE: lambda: onnx("backbone"),
            SECTION_ONNX_FLOW: lambda: onnx("flow"),
            SECTION_ONNX_HEAD: lambda: onnx("head"),
            SECTION_ONNX_TAIL: lambda: onnx("tail")}
    assert precision not in STAGE_PRECISIONS or backend == "openvino", "two-stage precisions are OpenVINO's"
    return {name: make[name]() for name in required_sections(backend, precision)}
