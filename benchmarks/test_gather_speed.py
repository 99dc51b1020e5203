"""Channel gathers in the CPU engine's flow graph, same run: Gather nodes against 1x1 convolutions.

    python -m pytest benchmarks/test_gather_speed.py --benchmark-columns=median,iqr,rounds

Each coupling step reads its two halves through FastFlow's fixed random channel permutation. As Gather, Split
and Concat nodes ("gathers": the exported graph before 2026-12-02), OpenVINO runs them as reference kernels in
plain layout with layout reorders around them; as 1x1 convolutions with 0/1 weights on the state kept in two
blocks ("1x1 convolutions": the graph now, engine/builder/graph.py) they stay in its blocked layout, for C^2
more multiply-adds a pixel and step. Per configuration (benchmarks/stages.py, random weights: no cost
depends on the values): the maps graph as the engine exports it, compiled as the OpenVINO backend compiles
it (fp32, static batch 1, latency hint, torch's threads), one frame per call. benchmarks/NOTES.md has the
table.
"""

import numpy as np
import pytest
import torch

from benchmarks.stages import CONFIGS, make_model
from engine.backends import available_backends
from engine.backends.ov import compile_config
from engine.builder.export import export_onnx
from engine.builder.graph import InferenceGraph

pytestmark = pytest.mark.skipif("openvino" not in available_backends(), reason="OpenVINO is not installed")
NAMES = ["efficientnet_lite2 (default)", "resnet18 (paper)"]
VARIANTS = {"gathers": True, "1x1 convolutions": False}
ROUNDS = 20


def compiled_maps_graph(name: str, variant: str):
    import openvino as ov
    graph = InferenceGraph(make_model(CONFIGS[name])).eval()
    for scale in graph.scales.values():
        scale.gathers = VARIANTS[variant]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(export_onnx(graph, 1, "maps"), b""), "CPU",
                                  compile_config(torch.get_num_threads(), "fp32"))
    return compiled.create_infer_request(), graph.size


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_maps_graph(benchmark, name, variant):
    benchmark.group = f"{name} | maps graph, OpenVINO fp32 | batch 1"
    request, size = compiled_maps_graph(name, variant)
    x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    benchmark.pedantic(request.infer, args=({0: x},), rounds=ROUNDS, warmup_rounds=2)
