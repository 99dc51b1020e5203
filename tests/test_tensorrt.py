"""The TensorRT path on a CPU (TensorRT cannot be installed on our machines).

1. Static: the graph every model's plan is built from, against TensorRT 10's documented limits
   (engine/builder/tensorrt_limits.py: operators, TopK's k, pooling, casts, dynamic dimensions), for the
   backbones and geometries lineflow trains; the checker itself against graphs that break each limit.
2. A fake TensorRT: TensorRT 10's Python API as lineflow calls it, whose "plan" is the ONNX graph run by
   ONNX Runtime, reading its input from and writing its outputs to the raw addresses the backend binds. It
   stands in for the GPU's memory and the compiler, not for anything lineflow computes: the build, the
   backend's bindings, the fusion after the plan (engine/backends/trt.py DeviceScoring, in PyTorch on the
   CPU here) and auto's fallback to the CUDA path all run as they would on a GPU. Tolerance: 1e-4 against
   the PyTorch reference (map units), 1e-5 against the ONNX Runtime engine on the same graph.
3. The backend's own bookkeeping against a smaller fake (a plan whose profile takes batches 1-4): batches
   above the profile split, refusals raised, calls serialised; and a TensorRT build where TensorRT is
   missing, refused in one line.
"""

import ctypes
import importlib.machinery
import json
import sys
import threading
import time
import types

import numpy as np
import onnx
import pytest
import torch
from conftest import MTD, perturbed_model, run
from onnx import TensorProto, helper
from PIL import Image

import engine
from benchmarks import stages
from engine.builder import BuildConfig, build_engine, export_onnx
from engine.builder.export import tensorrt_plan
from engine.builder.graph import InferenceGraph
from engine.builder.tensorrt_limits import TENSORRT_TOPK_MAX, tensorrt_graph_problems
from engine.common.errors import RunError, UserError
from engine.common.images import read_image
from engine.format import read_engine
from train.checkpoint import load_model, save_model
from train.model import FlowConfig

# ------------------------------------------------------------------ 1. the graph against TensorRT's limits

GEOMETRIES = {  # what lineflow trains: the default (lite2, 256²), the other backbones, rectangles (issue 17)
    "lite2-256": FlowConfig(backbone="efficientnet_lite2", input_size=256),
    "lite0-256": FlowConfig(backbone="efficientnet_lite0", input_size=256),
    "resnet18-256": FlowConfig(backbone="resnet18", input_size=256),
    "lite2-544x224": FlowConfig(backbone="efficientnet_lite2", input_size=(224, 544)),
    "resnet18-384x160-all-scales": FlowConfig(backbone="resnet18", input_size=(160, 384), map_scales="all",
                                              image_scales="all"),
}


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_every_models_plan_graph_fits_tensorrt(name):
    """The graph engine.build hands TensorRT: no problem, no TopK, the batch the one dynamic dimension, and the
    outputs the per-scale maps that the header's scoring fuses after the plan."""
    graph = InferenceGraph(stages.make_model(GEOMETRIES[name])).eval()
    spec = graph.scoring_spec()
    for batch in (None, 4):
        model = onnx.load_from_string(export_onnx(graph, batch, "maps"))
        assert tensorrt_graph_problems(model) == []
        assert "TopK" not in {n.op_type for n in model.graph.node}
        b = "batch" if batch is None else batch
        assert [(v.name, _dims(v)) for v in model.graph.input] == [("images", [b, 3, *graph.size])]
        assert [(v.name, _dims(v)) for v in model.graph.output] == [
            (f"q{i}", [b, *hw]) for i, hw in enumerate(spec.shapes)]


def test_the_whole_model_graph_is_beyond_tensorrt_and_the_build_says_so():
    """The graph that ends at the score (export part "full") holds a TopK of 10 % of the map: 6554 at 256²,
    above TensorRT's 3840. The checker finds it, and tensorrt_plan refuses it before TensorRT is imported."""
    graph = InferenceGraph(stages.make_model(GEOMETRIES["lite2-256"])).eval()
    full = export_onnx(graph, None, "full")
    problems = tensorrt_graph_problems(full)
    assert any(f"k = 6554 is above TensorRT's TopK limit of {TENSORRT_TOPK_MAX}" in p for p in problems), problems
    with pytest.raises(UserError, match="exceeds TensorRT's limits.*k = 6554"):
        tensorrt_plan(full, "fp32", None, graph.size)


def _graph(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _value(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


@pytest.mark.parametrize("case,expected", [
    ("topk", "k = 4000 is above"), ("topk_unsorted", "sorted = 1"), ("dynamic_width", "dynamic dimensions [0, 3]"),
    ("unknown_op", "Einsum"), ("double", "DOUBLE"), ("opset", "opset 21"), ("pool_1d", "2D or 3D"),
    ("topk_k_computed", "build-time constant"), ("fits", None)])
def test_the_checker_flags_each_limit(case, expected):
    x, y = _value("x", ["batch", 1, 80, 80]), _value("y", ["batch", 1, 80, 80])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000 if case == "topk" else 100])
    flat = helper.make_node("Flatten", ["x"], ["f"], axis=1)
    topk = helper.make_node("TopK", ["f", "k"], ["v", "i"], axis=1, sorted=0 if case == "topk_unsorted" else 1)
    nodes, outputs, inits, opset = [flat, topk], [_value("v", ["batch", 100])], [k], 17
    if case == "dynamic_width":
        x = _value("x", ["batch", 1, 80, "w"])
    elif case == "unknown_op":
        nodes = [helper.make_node("Einsum", ["x"], ["y"], equation="bchw->bchw")]
        outputs, inits = [y], []
    elif case == "double":
        nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)]
        outputs, inits = [y], []
    elif case == "opset":
        opset = 21
    elif case == "pool_1d":
        nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3])]
        outputs, inits = [y], []
    elif case == "topk_k_computed":
        nodes = [flat, helper.make_node("Shape", ["f"], ["s"], start=1),
                 helper.make_node("TopK", ["f", "s"], ["v", "i"], axis=1)]
        inits = []
    problems = tensorrt_graph_problems(_graph(nodes, [x], outputs, inits, opset))
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------ 2. the build and the backend, on a fake


class FakeTensorRT:
    """The parts of TensorRT 10's Python API that engine/builder/export.py and engine/backends/trt.py call."""

    fail_build = False  # build_serialized_network returns None, as TensorRT does when a build fails
    calls: list = []

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class MemoryPoolType:
        WORKSPACE = 0

    class BuilderFlag:
        FP16, BF16 = "fp16", "bf16"

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, data: bytes) -> bool:
            self.network["onnx"] = bytes(data)
            onnx.checker.check_model(onnx.load_from_string(data))
            return True

        def get_error(self, i):
            raise IndexError(i)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return {}

        def create_builder_config(self):
            return types.SimpleNamespace(set_memory_pool_limit=lambda *a: None, flags=[],
                                         set_flag=lambda f: None, profiles=[],
                                         add_optimization_profile=lambda p: FakeTensorRT.profiles.append(p))

        def create_optimization_profile(self):
            profile = {}
            profile["set_shape"] = lambda name, lo, opt, hi: profile.update({name: [lo, opt, hi]})
            return types.SimpleNamespace(set_shape=profile["set_shape"], shapes=profile)

        def build_serialized_network(self, network, config):
            if FakeTensorRT.fail_build:
                return None
            head = json.dumps({"images": FakeTensorRT.profiles[-1].shapes["images"]}).encode()
            return head + b"\n" + network["onnx"]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            head, _, graph = bytes(data).partition(b"\n")
            return FakeTensorRT.Plan(json.loads(head)["images"], graph)

    class Plan:
        def __init__(self, profile, graph):
            import onnxruntime as ort
            self.profile, self.session = profile, ort.InferenceSession(graph, providers=["CPUExecutionProvider"])

        def get_tensor_profile_shape(self, name, index):
            return tuple(tuple(s) for s in self.profile)

        def create_execution_context(self):
            return FakeTensorRT.Context(self)

    class Context:
        def __init__(self, plan):
            self.plan, self.shape, self.addresses = plan, None, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.plan.profile
            self.shape = tuple(shape)
            return name == "images" and all(a <= s <= b for a, s, b in zip(lo, shape, hi))

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            def at(address, shape):  # the float32 array at a raw address (CPU memory standing in for the GPU's)
                n = int(np.prod(shape))
                return np.ctypeslib.as_array((ctypes.c_float * n).from_address(address)).reshape(shape)
            images = at(self.addresses["images"], self.shape).copy()
            outputs = self.plan.session.run(None, {"images": images})
            for out, value in zip(self.plan.session.get_outputs(), outputs):
                at(self.addresses[out.name], value.shape)[...] = value
            FakeTensorRT.calls.append(self.shape[0])
            return True


FakeTensorRT.profiles = []


@pytest.fixture
def fake_gpu(monkeypatch):
    """TensorRT 'installed' as the fake, the build believing a GPU is visible, the backend's tensors on the CPU."""
    module = types.ModuleType("tensorrt")
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    for name in ("Logger", "MemoryPoolType", "BuilderFlag", "OnnxParser", "Builder", "Runtime"):
        setattr(module, name, getattr(FakeTensorRT, name))
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr("engine.builder.builder._gpu_visible", lambda: True)
    monkeypatch.setattr("engine.backends.trt.DEVICE", "cpu")
    monkeypatch.setattr(FakeTensorRT, "fail_build", False)
    monkeypatch.setattr(FakeTensorRT, "calls", [])
    return FakeTensorRT


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A 64² model with non-trivial flow weights, saved as model.pt (the build's input)."""
    model = perturbed_model(size=64)
    path = tmp_path_factory.mktemp("trt") / "model.pt"
    save_model(path, model, {"threshold": {"threshold": 1.0}})
    return model, path


def _build(model_path, out, config):
    model, meta = load_model(model_path)
    return build_engine(model, meta, model_path.read_bytes(), out, config)


def _real_frames():
    if not (MTD / "test").is_dir():
        pytest.skip("../shared/data/mtd is absent (real-image check)")
    paths = [sorted((MTD / "test" / t).iterdir())[0] for t in ("good", "blowhole", "break", "crack", "fray")]
    return [read_image(p) for p in paths]


def test_tensorrt_engine_matches_the_reference(fake_gpu, small_model, tmp_path, capsys):
    """Built by engine.build --backend tensorrt, loaded by engine.load: maps and scores within 1e-4 of the
    PyTorch reference on real MTD images and random ones, batches above the plan's profile split."""
    model, path = small_model
    out = tmp_path / "trt.engine"
    header = _build(path, out, BuildConfig(backend="tensorrt", precision="fp32", batch=None))
    assert header.backend == "tensorrt" and header.scoring is not None
    _, sections = read_engine(out)
    plan_graph = onnx.load_from_string(sections["tensorrt_plan"].partition(b"\n")[2])
    assert [o.name for o in plan_graph.graph.output] == [f"q{i}" for i in range(len(header.scoring.shapes))]
    frames = _real_frames() + [np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)]
    _build(path, tmp_path / "ort.engine", BuildConfig(backend="onnxruntime"))
    with engine.load(out) as eng, engine.load(tmp_path / "ort.engine") as reference:
        results, expected = eng.infer(frames), reference.infer(frames)
    for r, e in zip(results, expected):  # the ONNX Runtime engine is itself checked against the reference
        assert abs(r.score - e.score) <= 1e-5 * max(1.0, abs(e.score))
        assert np.abs(r.anomaly_map - e.anomaly_map).max() <= 1e-5 * max(1.0, np.abs(e.anomaly_map).max())
    from engine.preprocess import frames_to_input
    x = frames_to_input(frames, (64, 64))
    with torch.no_grad():
        ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(x)))
    with engine.load(out) as eng:
        maps, scores = eng.backend.infer(x)
        big = np.concatenate([x] * 30)  # 180 frames: above the profile's 128, in two plan calls
        FakeTensorRT.calls.clear()
        big_maps, big_scores = eng.backend.infer(big)
    assert np.abs(maps - ref_map).max() <= 1e-4 * max(1.0, np.abs(ref_map).max())
    assert np.abs(scores - ref_score).max() <= 1e-4 * max(1.0, np.abs(ref_score).max())
    assert FakeTensorRT.calls == [128, 52]
    np.testing.assert_allclose(big_scores, np.tile(scores, 30), rtol=1e-6, atol=1e-6)


def test_auto_on_a_gpu_takes_tensorrt(fake_gpu, small_model, tmp_path, capsys):
    _, path = small_model
    header = _build(path, tmp_path / "a.engine", BuildConfig(backend="auto", precision="fp32"))
    assert header.backend == "tensorrt" and "falling back" not in capsys.readouterr().out


def test_auto_falls_back_to_the_cuda_path_when_the_plan_fails(fake_gpu, small_model, tmp_path, capsys):
    """A plan that does not build: auto prints why and builds the torch engine (the CUDA path on a GPU; here,
    without one, the PyTorch reference it wraps); --backend tensorrt named explicitly fails in one line instead."""
    _, path = small_model
    fake_gpu.fail_build = True
    header = _build(path, tmp_path / "a.engine", BuildConfig(backend="auto", precision="fp32"))
    out = capsys.readouterr().out
    assert header.backend == "torch"
    assert "auto: tensorrt failed (TensorRT failed to build the engine" in out and "falling back to torch" in out
    assert "TensorRT failed to build" in header.checks["auto_tensorrt_failed"]
    with engine.load(tmp_path / "a.engine") as eng:
        assert np.isfinite(eng.infer(np.zeros((64, 64, 3), np.uint8)).score)
    with pytest.raises((UserError, RunError), match="TensorRT failed to build"):
        _build(path, tmp_path / "t.engine", BuildConfig(backend="tensorrt", precision="fp32"))
    assert not (tmp_path / "t.engine").exists()


def test_a_tiling_model_runs_on_tensorrt(fake_gpu, strips, tiled_model, tmp_path):  # noqa: F811 - fixtures
    """Tiled frames need the map the score reads (Backend.infer_maps): the plan ends at the maps, so TensorRT
    tiles as the CPU backends do. Against the ONNX Runtime engine on the same frames: 1e-5."""
    model_path = tiled_model
    _build(model_path, tmp_path / "t.engine", BuildConfig(backend="tensorrt", precision="fp32"))
    _build(model_path, tmp_path / "o.engine", BuildConfig(backend="onnxruntime"))
    paths = (strips / "test" / "spot" / "0.png", strips / "train" / "good" / "0.png")  # 160x64 and 200x80
    frames = [np.asarray(Image.open(p)) for p in paths]
    with engine.load(tmp_path / "t.engine") as trt, engine.load(tmp_path / "o.engine") as ort:
        assert trt.tiling is not None
        for r, e in zip(trt.infer(frames), ort.infer(frames)):
            assert r.anomaly_map.shape == e.anomaly_map.shape
            assert abs(r.score - e.score) <= 1e-5 * max(1.0, abs(e.score))
            assert np.abs(r.anomaly_map - e.anomaly_map).max() <= 1e-5 * max(1.0, np.abs(e.anomaly_map).max())


# ------------------------------------------------------------ 3. the backend's bookkeeping, on a smaller fake

class _FakeTensorRT:
    """tensorrt's API as the backend uses it: a plan whose profile takes batches 1-4 and computes the channel
    mean as its one 64x64 map, which the backend's fusion (no blur, the top 4096 pixels) leaves as the anomaly map
    and averages for the score; it records each call's batch and the stream it ran on."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _FakeTensorRT.Plan() if data == b"plan" else None

    class Plan:
        def get_tensor_profile_shape(self, name, profile):
            return (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)

        def create_execution_context(self):
            return _FakeTensorRT.Context()

    class Context:
        backend = None
        fail = None

        def __init__(self):
            self.calls, self.shape = [], None

        def set_input_shape(self, name, shape):
            self.shape = shape
            return self.fail != "shape" and 1 <= shape[0] <= 4

        def set_tensor_address(self, name, address):
            return True

        def execute_async_v3(self, stream):
            if self.fail == "execute":
                return False
            b = self.backend.bindings
            b["q0"].copy_(b["images"].mean(1))
            self.calls.append((self.shape[0], stream))
            return True


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import types
    from dataclasses import replace

    from engine.backends.trt import TensorRTBackend
    from engine.header import EngineHeader, ScoringSpec
    module = types.ModuleType("tensorrt")
    for name in ("Logger", "Runtime"):
        setattr(module, name, getattr(_FakeTensorRT, name))
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    scoring = ScoringSpec(size=(64, 64), sigma=0.0, top_k=64 * 64, shapes=((64, 64),), map_weights=(1.0,),
                          image_weights=(1.0,))
    header = replace(EngineHeader(input_size=64, threshold=1.0, backend="torch", precision="fp32"),
                     backend="tensorrt", scoring=scoring)
    backend = TensorRTBackend(header, {"tensorrt_plan": b"plan"}, device="cpu")
    backend.context.backend = backend
    return backend


def test_tensorrt_batches_above_the_profile_are_split(fake_tensorrt):
    images = np.random.default_rng(0).random((10, 3, 64, 64), dtype=np.float32)
    maps, scores = fake_tensorrt.infer(images)
    assert [b for b, _ in fake_tensorrt.context.calls] == [4, 4, 2]  # 10 frames: chunks of the profile's 4, unpadded
    np.testing.assert_allclose(maps, images.mean(1), rtol=1e-6)
    np.testing.assert_allclose(scores, images.mean((1, 2, 3)), rtol=1e-6)  # every frame its own result


@pytest.mark.parametrize("fail", ["shape", "execute"])
def test_tensorrt_refusals_are_errors_not_stale_buffers(fake_tensorrt, fail):
    from engine.common.errors import RunError
    fake_tensorrt.context.fail = fail
    with pytest.raises(RunError, match="TensorRT"):
        fake_tensorrt.infer(np.zeros((2, 3, 64, 64), np.float32))


def test_tensorrt_calls_are_serialised(fake_tensorrt):
    inside, overlaps = [0], []
    execute = fake_tensorrt.context.execute_async_v3

    def slow_execute(stream):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.01)
        inside[0] -= 1
        return execute(stream)
    fake_tensorrt.context.execute_async_v3 = slow_execute
    images = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    outs = [None] * 8

    def work(i):
        outs[i] = fake_tensorrt.infer(images * (i + 1))[1]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1
    for i, s in enumerate(outs):
        np.testing.assert_allclose(s, (images * (i + 1)).mean((1, 2, 3)), rtol=1e-6)


def test_tensorrt_without_tensorrt_is_refused_in_one_line(tiled_model, tmp_path):
    """A tiling model builds for TensorRT (tests/test_tensorrt.py, on a fake); here TensorRT is absent."""
    proc = run("engine.build", str(tiled_model), "-o", str(tmp_path / "t.engine"), "--backend", "tensorrt",
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "backend tensorrt is not installed here" in proc.stderr
