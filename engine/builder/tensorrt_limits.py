"""TensorRT's limits on an ONNX graph, checked statically (build side; imports onnx, not TensorRT).

TensorRT cannot be installed on our machines, so the graph a plan is built from is checked here
against the ONNX-TensorRT parser's documented operator matrix (onnx/onnx-tensorrt docs/operators.md,
TensorRT 10: opsets 9-20 from 10.0 on; TopK's k at most 3840, `sorted` 1; pooling 2D/3D with unit
dilations; no resize antialiasing; axes of reductions and (un)squeezes constant; no DOUBLE tensors),
and against what lineflow's plans need: one dynamic dimension at most, the batch. engine.build runs
it before TensorRT (a clear reason where TensorRT's own log would be long), and tests/test_tensorrt.py
runs it on every model lineflow trains.
"""

from __future__ import annotations

import onnx

__all__ = ["TENSORRT_OPSETS", "TENSORRT_TOPK_MAX", "TENSORRT_OPS", "tensorrt_graph_problems"]

TENSORRT_OPSETS = (9, 20)  # the default-domain opsets every TensorRT 10 release parses
TENSORRT_TOPK_MAX = 3840
# the operators lineflow's graphs use or may come to use, each supported by TensorRT 10's ONNX parser (the
# matrix lists more; an operator missing here is flagged until someone checks the matrix and adds it)
TENSORRT_OPS = frozenset("""
Abs Add AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv Div Equal Erf Exp
Expand Flatten Floor Gather Gemm GlobalAveragePool Greater GreaterOrEqual HardSigmoid HardSwish Identity
LayerNormalization LeakyRelu Less LessOrEqual Log MatMul Max MaxPool Min Mul Neg Not Pad Pow Reciprocal
ReduceMax ReduceMean ReduceSum Relu Reshape Resize Shape Sigmoid Slice Softmax Split Sqrt Squeeze Sub Tanh TopK
Transpose Unsqueeze Where
""".split())
_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT32,
          onnx.TensorProto.INT64, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}
_CONSTANT_INPUTS = {"TopK": 1, "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "Squeeze": 1, "Unsqueeze": 1}
_POOLS = ("AveragePool", "MaxPool")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_values(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and _attr(node, "value") is not None:
            values[node.output[0]] = _attr(node, "value")
    return values


def _dims_problems(kind: str, value: onnx.ValueInfoProto) -> list[str]:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return [f"{kind} {value.name!r} has no static rank"]
    dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
    if any(i != 0 for i in dynamic):
        return [f"{kind} {value.name!r} has dynamic dimensions {dynamic}: only the batch (0) may be dynamic"]
    return []


def tensorrt_graph_problems(model: bytes | onnx.ModelProto) -> list[str]:
    """Everything in the graph that TensorRT 10 would refuse or that lineflow's plans do not allow; [] = fits."""
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    problems = []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    version = opsets.pop("ai.onnx", None)
    if version is None or not TENSORRT_OPSETS[0] <= version <= TENSORRT_OPSETS[1]:
        problems.append(f"opset {version}: TensorRT 10 parses opsets {TENSORRT_OPSETS[0]}-{TENSORRT_OPSETS[1]}")
    if opsets:
        problems.append(f"operators from other domains ({', '.join(sorted(opsets))}): custom ops need plugins")
    graph = model.graph
    constants = _constant_values(graph)
    for value in graph.input:
        problems += _dims_problems("input", value)
    for value in graph.output:
        problems += _dims_problems("output", value)
    for t in graph.initializer:
        if t.data_type not in _TYPES:
            problems.append(f"initializer {t.name!r} is {onnx.TensorProto.DataType.Name(t.data_type)}")
    for node in graph.node:
        op, where = node.op_type, f"{node.op_type} {node.name!r}"
        if op not in TENSORRT_OPS:
            problems.append(f"{where}: operator not in TensorRT's checked list")
            continue
        index = _CONSTANT_INPUTS.get(op)
        if index is not None and len(node.input) > index and node.input[index] not in constants:
            problems.append(f"{where}: input {index} must be a build-time constant for TensorRT")
        if op == "TopK":
            k = constants.get(node.input[1])
            k = int(onnx.numpy_helper.to_array(k).reshape(-1)[0]) if k is not None else None
            if k is not None and k > TENSORRT_TOPK_MAX:
                problems.append(f"{where}: k = {k} is above TensorRT's TopK limit of {TENSORRT_TOPK_MAX}")
            if _attr(node, "sorted", 1) != 1:
                problems.append(f"{where}: TensorRT's TopK needs sorted = 1")
        elif op in _POOLS or op == "Conv":
            kernel = _attr(node, "kernel_shape")
            if op in _POOLS and (kernel is None or len(kernel) not in (2, 3)):
                problems.append(f"{where}: TensorRT pools in 2D or 3D only")
            if op in _POOLS and any(d != 1 for d in _attr(node, "dilations", []) or []):
                problems.append(f"{where}: TensorRT pools with unit dilations only")
        elif op == "Resize":
            if _attr(node, "antialias", 0):
                problems.append(f"{where}: TensorRT's Resize does not antialias")
            if _attr(node, "mode", b"nearest") not in (b"nearest", b"linear"):
                problems.append(f"{where}: TensorRT resizes nearest or linear only")
        elif op == "Cast" and _attr(node, "to") not in _TYPES:
            problems.append(f"{where}: casts to {onnx.TensorProto.DataType.Name(_attr(node, 'to'))}")
        elif op == "Constant" and _attr(node, "value") is not None and _attr(node, "value").data_type not in _TYPES:
            problems.append(f"{where}: a {onnx.TensorProto.DataType.Name(_attr(node, 'value').data_type)} constant")
        elif op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: TensorRT computes LayerNormalization's first output only")
    return problems
