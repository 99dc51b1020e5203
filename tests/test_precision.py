"""Per-stage precision: the polynomial atan, the two-graph splits, OpenVINO's bf16-flow, bf16-deep and int8
engines.

Tolerances: the split graphs equal the one-graph maps to 1e-5 (float32 rounding); a bf16-flow or bf16-deep
engine and an int8 one stay within the build's low-precision tolerance of the reference (0.1 map units, 0.02
on scores).
"""

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import MTD, perturbed_model, rewrite_version

import engine
from engine.builder import BuildConfig, build_engine, builder, export_onnx
from engine.builder.builder import (
    LOW_PRECISION_TOLERANCE,
    PRECISION_MARGIN,
    SETTLE_S,
    _auto_candidates,
    _calibration_images,
    _keep_precision,
    _ms_per_frame,
    openvino_capabilities,
)
from engine.builder.export import ONNX_PARTS
from engine.builder.graph import InferenceGraph
from engine.common.errors import UserError
from engine.common.images import read_image
from engine.format import EngineFileError, read_engine, write_engine
from engine.header import PART_PRECISIONS, required_sections
from kernels.reference import poly_atan
from train.backbones import BACKBONES, create_backbone
from train.checkpoint import save_model
from train.data import to_model_input
from train.model import FlowConfig

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def test_poly_atan_matches_atan():
    x = torch.cat([torch.linspace(-50, 50, 200_001), torch.tensor([0.0, 1.0, -1.0, 1e-8, -1e-8, 1e6, -1e6])])
    err = (poly_atan(x).double() - torch.atan(x.double())).abs().max().item()
    assert err <= 3e-7  # measured 1.9e-7 (the fit's 7.5e-8 plus float32 rounding)


@pytest.mark.parametrize("first, second", [("backbone", "flow"), ("head", "tail")])
def test_split_graphs_equal_the_one_graph(first, second):
    """backbone -> features -> flow (bf16-flow), or backbone to its stride-4 map -> the rest (bf16-deep), as two
    ONNX graphs, computes what the one maps graph computes."""
    graph = InferenceGraph(perturbed_model()).eval()
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    session = {part: ort.InferenceSession(export_onnx(graph, None, part)) for part in ("maps", first, second)}
    ref = session["maps"].run(None, {"images": x})
    middle = session[first].run(None, {"images": x})
    names = [i.name for i in session[second].get_inputs()]
    maps = session[second].run(None, dict(zip(names, middle, strict=True)))
    assert len(maps) == len(ref) == len(graph.scales)
    for q, r in zip(maps, ref):
        assert np.abs(q - r).max() <= 1e-5 * max(1.0, np.abs(r).max())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_head_and_tail_make_the_whole(name):
    """bf16-deep's cut: every backbone's head (to the stride-4 map) and tail give forward's four maps."""
    backbone = create_backbone(name, load_weights=False)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        whole, first = backbone(x), backbone.head(x)
        parts = [first, *backbone.tail(first)]
    assert len(parts) == len(whole) == 4
    for a, b in zip(parts, whole):
        assert torch.equal(a, b)


def test_exporting_leaves_the_model_as_it_was():
    """torch.onnx.export restores the train/eval mode it found on the module it exports: the frozen backbone's
    BatchNorms must stay in eval mode through every part (a second build in one process would read moved maps)."""
    model = perturbed_model().eval()
    graph = InferenceGraph(model).eval()
    x = torch.from_numpy(np.random.default_rng(3).random((2, 3, 64, 64), dtype=np.float32))
    with torch.no_grad():
        before = model(x)[0]
    for part in ONNX_PARTS:
        export_onnx(graph, None, part)
    assert not any(m.training for m in model.backbone.modules())
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)


def _stage_engine(tmp_path_factory, precision: str):
    if not HAS_OPENVINO:
        pytest.skip(f"openvino is not installed: {precision} is an OpenVINO precision")
    caps = openvino_capabilities()
    if "BF16" not in caps:
        pytest.skip(f"this CPU has no native BF16 (OpenVINO reports {', '.join(caps)}): the build refuses {precision}")
    model = perturbed_model()
    path = tmp_path_factory.mktemp("p") / "model.pt"
    save_model(path, model, {"threshold": {"threshold": 1.0}})
    out = path.with_name(f"{precision}.engine")
    header = build_engine(model, {"threshold": {"threshold": 1.0}}, path.read_bytes(), out,
                          BuildConfig("openvino", precision))
    return model, out, header


@pytest.fixture(scope="module")
def bf16_flow_engine(tmp_path_factory):
    return _stage_engine(tmp_path_factory, "bf16-flow")


@pytest.fixture(scope="module")
def bf16_deep_engine(tmp_path_factory):
    return _stage_engine(tmp_path_factory, "bf16-deep")


STAGE_ENGINES = pytest.mark.parametrize("stage_engine", ["bf16_flow_engine", "bf16_deep_engine"])


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: two-stage precisions are OpenVINO's")
@STAGE_ENGINES
def test_two_stage_engine_carries_two_graphs_and_matches_reference(stage_engine, request):
    model, path, header = request.getfixturevalue(stage_engine)
    assert header.backend == "openvino" and header.precision == {"bf16_flow_engine": "bf16-flow",
                                                                 "bf16_deep_engine": "bf16-deep"}[stage_engine]
    _, sections = read_engine(path)
    assert list(sections) == list(required_sections("openvino", header.precision)) and len(sections) == 2
    assert header.checks["part_precisions"] == PART_PRECISIONS[header.precision]
    x = np.random.default_rng(2).random((4, 3, 64, 64), dtype=np.float32)
    amap, score = engine.load(path).infer_prepared(x)
    with torch.no_grad():
        ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(x)))
    assert np.abs(amap - ref_map).max() <= LOW_PRECISION_TOLERANCE["map"] * max(1.0, np.abs(ref_map).max())
    assert np.abs(score - ref_score).max() <= LOW_PRECISION_TOLERANCE["score"] * max(1.0, np.abs(ref_score).max())


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: two-stage precisions are OpenVINO's")
@pytest.mark.skipif(not (MTD / "test").is_dir(), reason=f"real data absent: {MTD} is not on this machine")
@STAGE_ENGINES
def test_two_stage_engine_on_real_images(stage_engine, request):
    model, path, _ = request.getfixturevalue(stage_engine)
    paths = [sorted((MTD / "test" / t).iterdir())[0] for t in ("good", "blowhole", "break", "crack", "fray")]
    frames = [read_image(p) for p in paths]
    results = engine.load(path).infer(frames)
    with torch.no_grad():
        _, ref_score = model(torch.stack([to_model_input(f, 64) for f in frames]))
    scores = np.array([r.score for r in results])
    assert np.abs(scores - ref_score.numpy()).max() <= LOW_PRECISION_TOLERANCE["score"] * max(
        1.0, ref_score.abs().max().item())


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: two-stage precisions are OpenVINO's")
@STAGE_ENGINES
def test_every_batch_size_gets_the_same_scores(stage_engine, request):
    """OpenVINO engines run a single frame on the latency graph and batches over the throughput streams."""
    _, path, _ = request.getfixturevalue(stage_engine)
    eng = engine.load(path)
    x = np.random.default_rng(4).random((10, 3, 64, 64), dtype=np.float32)
    single = np.concatenate([eng.infer_prepared(x[i:i + 1])[1] for i in range(10)])
    for b in range(2, 11):
        scores = eng.infer_prepared(x[:b])[1]
        assert np.abs(scores - single[:b]).max() <= 1e-3 * max(1.0, np.abs(single).max())


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_fixed_batch_openvino_engine_matches_reference(tmp_path):
    model = perturbed_model()
    path = tmp_path / "model.pt"
    save_model(path, model, {"threshold": {"threshold": 1.0}})
    out = tmp_path / "b3.engine"
    build_engine(model, {"threshold": {"threshold": 1.0}}, path.read_bytes(), out, BuildConfig("openvino", "fp32", 3))
    x = np.random.default_rng(5).random((5, 3, 64, 64), dtype=np.float32)
    amap, score = engine.load(out).infer_prepared(x)
    with torch.no_grad():
        ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(x)))
    assert np.abs(amap - ref_map).max() <= 1e-4 * max(1.0, np.abs(ref_map).max())
    assert np.abs(score - ref_score).max() <= 1e-4 * max(1.0, np.abs(ref_score).max())


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: two-stage precisions are OpenVINO's")
@STAGE_ENGINES
def test_engine_missing_a_stage_is_refused(stage_engine, request, tmp_path):
    _, path, _ = request.getfixturevalue(stage_engine)
    header, sections = read_engine(path)
    second = list(sections)[-1]
    del sections[second]
    broken = tmp_path / "broken.engine"
    write_engine(broken, header, sections)
    with pytest.raises(EngineFileError, match=f"lacks its section {second}"):
        engine.load(broken)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: bf16-flow is an OpenVINO precision")
def test_version_2_files_are_still_read(bf16_flow_engine, tmp_path):
    """Format 3 only added the two-graph sections: a version 2 file reads as before."""
    _, path, _ = bf16_flow_engine
    old = tmp_path / "v2.engine"
    rewrite_version(path, old, 2)
    x = np.random.default_rng(3).random((1, 3, 64, 64), dtype=np.float32)
    assert np.array_equal(engine.load(old).infer_prepared(x)[1], engine.load(path).infer_prepared(x)[1])


def test_auto_tries_all_bf16_only_with_real_check_images():
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed: its precisions are not offered")
    with_calib, without = _auto_candidates("openvino", True), _auto_candidates("openvino", False)
    assert not {"bf16", "bf16-deep"} & set(without) and without[-1] == "fp32" and with_calib[-1] == "fp32"
    if "BF16" in openvino_capabilities():
        assert with_calib.index("bf16") < with_calib.index("bf16-deep") < with_calib.index("bf16-flow")
    assert _auto_candidates("onnxruntime", True) == ["fp32"]


def test_auto_tries_int8_only_with_real_check_images():
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed: its precisions are not offered")
    with_calib, without = _auto_candidates("openvino", True), _auto_candidates("openvino", False)
    assert "int8-backbone" in with_calib and not {"int8", "int8-backbone"} & set(without)
    assert "int8" not in with_calib  # an int8 flow is asked for by name only (its maps move too far)


def test_auto_keeps_a_lower_precision_only_when_it_pays():
    """Timed level, the more precise engine is kept; a lower precision must be PRECISION_MARGIN faster."""
    level = {"bf16-flow": 18.0, "fp32": 18.0 * (1 + PRECISION_MARGIN / 2)}
    faster = {"bf16-flow": 15.0, "fp32": 15.0 * (1 + 2 * PRECISION_MARGIN)}
    assert _keep_precision(level) == "fp32" and _keep_precision(faster) == "bf16-flow"
    assert _keep_precision({"int8-backbone": 14.0, "bf16-flow": 14.2, "fp32": 20.0}) == "bf16-flow"
    assert _keep_precision({"int8-backbone": 20.0, "fp32": 14.0}) == "fp32"


def test_candidates_are_timed_in_turns():
    """Round after round, each candidate once a round: a drift of the machine's speed falls on all alike."""
    calls: list[str] = []
    ms = _ms_per_frame({k: (lambda x, k=k: calls.append(k)) for k in ("a", "b")}, np.zeros((1, 3, 8, 8)), None,
                       rounds=3, settle_s=0.0)
    assert calls == ["a", "b"] + ["a", "b"] * 3 and set(ms) == {"a", "b"}


def test_candidates_rest_before_each_timed_call(monkeypatch):
    """ONNX Runtime's threads spin on after its calls and slowed the OpenVINO call after them 1.7x: in turns, each
    timed call follows a rest; a lone candidate is timed without one."""
    events: list = []
    monkeypatch.setattr(builder.time, "sleep", lambda s: events.append(s))
    infers = {k: (lambda x, k=k: events.append(k)) for k in ("a", "b")}
    _ms_per_frame(infers, np.zeros((1, 3, 8, 8)), None, rounds=2)
    assert events == ["a", "b"] + [SETTLE_S, "a", SETTLE_S, "b"] * 2
    events.clear()
    _ms_per_frame({"a": infers["a"]}, np.zeros((1, 3, 8, 8)), None, rounds=2)
    assert events == ["a"] * 3


def test_int8_without_real_images_is_refused(tmp_path):
    model = perturbed_model()
    with pytest.raises(UserError, match="--calib"):
        build_engine(model, {"threshold": {"threshold": 1.0}}, b"", tmp_path / "e.engine",
                     BuildConfig("openvino", "int8-backbone"))
    assert not (tmp_path / "e.engine").exists()


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: int8 is an OpenVINO precision")
@pytest.mark.skipif(not (MTD / "test").is_dir(), reason=f"real data absent: {MTD} is not on this machine")
@pytest.mark.parametrize("precision", ["int8-backbone", "int8"])
def test_int8_engine_quantizes_what_it_says(tmp_path, monkeypatch, precision):
    """NNCF's quantized graph: int8 pairs where the precision says, the stem in fp32, the header saying so, and the
    check's numbers the engine's own: int8 does not pass the build's tolerance on every model (it did not on
    this one, 0.10 map units for int8-backbone), so the tolerance is lifted here to build it and look."""
    monkeypatch.setattr("engine.builder.builder.LOW_PRECISION_TOLERANCE", {"score": np.inf, "map": np.inf})
    model = perturbed_model()
    path = tmp_path / "model.pt"
    save_model(path, model, {"threshold": {"threshold": 1.0}})
    out = tmp_path / f"{precision}.engine"
    header = build_engine(model, {"threshold": {"threshold": 1.0}}, path.read_bytes(), out,
                          BuildConfig("openvino", precision, calib=str(MTD / "train" / "good")))
    assert header.precision == precision and header.checks["part_precisions"] == PART_PRECISIONS[precision]
    graph = onnx.load_from_string(read_engine(out)[1]["onnx"]).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n.name for n in graph.node if n.op_type == "Conv" and dequantized & set(n.input)]  # int8 convs
    assert any(q.startswith("/backbone/net/_blocks") for q in quantized)
    assert not any("_conv_stem" in q for q in quantized)
    assert any(q.startswith("/scales.") for q in quantized) == (precision == "int8")
    paths = [sorted((MTD / "test" / t).iterdir())[1] for t in ("good", "blowhole", "break", "crack", "fray")]
    x = np.stack([to_model_input(read_image(p), 64).numpy() for p in paths])
    amap, score = engine.load(out).infer_prepared(x)
    with torch.no_grad():
        ref_map, ref_score = (t.numpy() for t in model(torch.from_numpy(x)))
    diff = np.abs(amap - ref_map).max() / max(1.0, np.abs(ref_map).max())
    assert np.isfinite(amap).all() and 0 < diff < 10  # int8 arithmetic: different, not broken
    recorded = header.checks[f"openvino_{precision}_vs_reference"]
    assert 0 < recorded["max_map_diff"] < 10 and recorded["tolerance"]["map"] == np.inf


def test_tiled_models_are_checked_on_their_tiles(demo_dir):
    """A tiling model meets tiles at its scale, not whole frames squeezed to its input: so do its checks (and the
    int8 ranges taken from them)."""
    folder = str(demo_dir / "train" / "good")
    tiles, desc = _calibration_images(folder, FlowConfig(input_size=(64, 64), tile_scale=1.5), limit=6)
    whole, whole_desc = _calibration_images(folder, FlowConfig(input_size=(64, 64)), limit=6)
    assert tiles.shape == (6, 3, 64, 64) and "tiles of" in desc  # 64 px frames at 1.5x: 4 tiles each
    assert whole.shape[1:] == (3, 64, 64) and "tiles" not in whole_desc
    assert tiles.min() >= 0 and tiles.max() <= 1
