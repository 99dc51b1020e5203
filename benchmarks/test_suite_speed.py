"""Line-speed suite: end to end and per stage, each backend against the PyTorch eager reference, same run.

    python -m pytest benchmarks/test_suite_speed.py --benchmark-json=benchmarks/results.json
    python -m benchmarks.report benchmarks/results.json     # markdown table + bar chart for docs/results.md

Configurations (benchmarks/stages.py): lineflow's default (efficientnet_lite2), efficientnet_lite0,
and the FastFlow paper's resnet18 setting; 256 px, random weights (no cost depends on the values).
End to end = a prepared (B, 3, 256, 256) batch -> maps + scores (the engine call, including the
native fusion); batch 1 gives latency, batch 8 throughput. Engines: ONNX Runtime fp32, OpenVINO fp32,
OpenVINO bf16-flow (backbone fp32, flow bf16: what `--precision auto` keeps for trained default models on a bf16
CPU where it pays) and bf16-deep (fp32 to the backbone's stride-4 map, bf16 after: what it keeps for lightly trained
ones). Each row starts after a 0.5 s rest (`quiet_cores`). Stages,
batch 1: preprocess (one 640x480 uint8 frame), backbone, flow (LayerNorm + 8 coupling steps + NLL per
scale), scoring (upsample, blur, fusion, top-k), each in PyTorch eager and in what the engine runs
(OpenVINO for the two networks, fp32 and for the flow also bf16; the native extension for the two ends).
"""

import io
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.stages import CONFIGS, ENGINES, build_engines, make_model
from engine import native
from engine.backends import available_backends
from engine.builder.builder import SETTLE_S
from engine.builder.graph import BackboneGraph, FlowGraph, InferenceGraph

HAS_OPENVINO = "openvino" in available_backends()
BATCHES = [1, 8]
ROUNDS = 10


@pytest.fixture(autouse=True)
def quiet_cores():
    """Each row starts with the cores quiet: ONNX Runtime's workers spin for about half a second after its calls,
    which slowed whatever ran next 1.5x (benchmarks/NOTES.md), here the row timed after the onnxruntime one."""
    time.sleep(SETTLE_S)


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request, tmp_path_factory):
    """Per configuration: the reference model, its folded graph, and one engine per installed backend."""
    name = request.param
    model = make_model(CONFIGS[name])
    engines = build_engines(model, tmp_path_factory.mktemp("suite"))
    return name, model, InferenceGraph(model).eval(), engines


def images(batch: int) -> np.ndarray:
    return np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["pytorch eager", *ENGINES])
def test_end_to_end(benchmark, setup, impl, batch):
    name, model, _, engines = setup
    benchmark.group = f"{name} | end to end | batch {batch}"
    x = images(batch)
    if impl == "pytorch eager":
        with torch.no_grad():
            benchmark.pedantic(model, args=(torch.from_numpy(x),), rounds=ROUNDS, warmup_rounds=1)
    else:
        benchmark.pedantic(engines[impl], args=(x,), rounds=ROUNDS, warmup_rounds=1)


def _openvino(module: torch.nn.Module, args: tuple, precision: str):
    """Compile one stage for OpenVINO (2 threads, latency) through ONNX, as the engine does."""
    import openvino as ov
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=17)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(core.read_model(buf.getvalue(), b""), "CPU", config)
    request = compiled.create_infer_request()
    return lambda *xs: request.infer({i: x.numpy() for i, x in enumerate(xs)})


# the backbone is not timed in bf16: no engine runs it so (a bf16 backbone cost 0.02 MTD image AUROC)
@pytest.mark.parametrize("stage,impl", [("backbone", "pytorch eager"), ("backbone", "openvino"),
                                        ("flow", "pytorch eager"), ("flow", "openvino"), ("flow", "openvino bf16")])
def test_network_stage(benchmark, setup, stage, impl):
    name, _, graph, _ = setup
    if impl.startswith("openvino") and not HAS_OPENVINO:
        pytest.skip("openvino is not installed")
    benchmark.group = f"{name} | stage {stage} | batch 1"
    x = torch.from_numpy(images(1))
    with torch.no_grad():
        feats = BackboneGraph(graph)(x)
    module, args = (BackboneGraph(graph), (x,)) if stage == "backbone" else (FlowGraph(graph), feats)
    run = module if impl == "pytorch eager" else _openvino(module, args, "bf16" if impl.endswith("bf16") else "f32")
    with torch.no_grad():
        benchmark.pedantic(run, args=args, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["pytorch eager", "native"])
def test_preprocess_stage(benchmark, setup, impl):
    name = setup[0]
    benchmark.group = f"{name} | stage preprocess (640x480 uint8) | batch 1"
    frame = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    if impl == "native":
        out = np.empty((1, 3, 256, 256), np.float32)
        benchmark.pedantic(native.preprocess, args=([frame], (256, 256)), kwargs={"out": out}, rounds=ROUNDS * 3,
                           warmup_rounds=1)
    else:
        def torch_pre(f):
            x = torch.from_numpy(f).permute(2, 0, 1)[None].float().div_(255)
            return F.interpolate(x, size=(256, 256), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        benchmark.pedantic(torch_pre, args=(frame,), rounds=ROUNDS * 3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["pytorch eager", "native"])
def test_scoring_stage(benchmark, setup, impl):
    name, _, graph, _ = setup
    benchmark.group = f"{name} | stage scoring | batch 1"
    with torch.no_grad():
        qmaps = FlowGraph(graph)(*BackboneGraph(graph)(torch.from_numpy(images(1))))
    if impl == "native":
        scoring = native.NativeScoring(graph.scoring_spec())
        qs = [q.numpy() for q in qmaps]
        benchmark.pedantic(scoring, args=(qs,), rounds=ROUNDS * 3, warmup_rounds=1)
    else:
        def torch_scoring(qs):
            maps = {int(k): F.interpolate(q[:, None], size=(256, 256), mode="bilinear", align_corners=False)
                    for k, q in zip(graph.scales, qs)}
            amap, smap = graph.fuse(maps)
            return amap, smap.flatten(1).topk(graph.top_k, dim=1).values.mean(1)
        with torch.no_grad():
            benchmark.pedantic(torch_scoring, args=(qmaps,), rounds=ROUNDS * 3, warmup_rounds=1)


def test_scoring_stage_agrees(setup):
    """The two scoring implementations timed above compute the same maps and scores."""
    _, _, graph, _ = setup
    with torch.no_grad():
        x = torch.from_numpy(images(2))
        qmaps = FlowGraph(graph)(*BackboneGraph(graph)(x))
        ref_map, ref_score = graph(x)
    amap, score = native.NativeScoring(graph.scoring_spec())([q.numpy() for q in qmaps])
    assert np.abs(amap - ref_map.numpy()).max() <= 1e-4 * max(1.0, float(ref_map.abs().max()))
    assert np.abs(score - ref_score.numpy()).max() <= 1e-4 * max(1.0, float(ref_score.abs().max()))
