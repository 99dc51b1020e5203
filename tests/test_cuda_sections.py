"""The CUDA path from what a torch engine carries: its kernels section and its header's scoring, against the reference.

The build packs the folded flow for the kernels (engine/builder/kernel_pack.py); the run side builds KernelGraph
from that section alone, plus the backbone and pool that the torch backend hands in (engine/backends/cuda.py).
Here the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), fp32: maps and
image scores within TOL (1e-4, map units) of the folded graph and of the model itself.
"""

import hashlib
import io
import struct

import numpy as np
import pytest
import torch
from conftest import MTD, TOL, perturbed_model

pytest.importorskip("triton", reason="the kernels need triton (pip install -e '.[dev]')")

import engine  # noqa: E402
from engine.backends.cuda import KernelGraph, read_kernel_section  # noqa: E402
from engine.backends.pytorch import flow_inputs  # noqa: E402
from engine.builder import BuildConfig, build_engine  # noqa: E402
from engine.builder.graph import InferenceGraph  # noqa: E402
from engine.common.images import images_in, read_image  # noqa: E402
from engine.format import EngineFileError, read_engine, write_engine  # noqa: E402
from engine.header import SECTION_KERNELS, SECTION_MODEL  # noqa: E402
from engine.preprocess import frames_to_input  # noqa: E402
from train.checkpoint import load_model_bytes, save_model  # noqa: E402


@pytest.fixture(scope="module")
def torch_engine(tmp_path_factory):
    """A torch engine (fp32, built on this CPU) of a small perturbed model with a rectangular input."""
    d = tmp_path_factory.mktemp("cuda_sections")
    model = perturbed_model(size=(64, 96), seed=5)
    save_model(d / "m.pt", model, {"threshold": {"threshold": 1.0}})
    path = d / "torch.engine"
    build_engine(model, {"threshold": {"threshold": 1.0}}, (d / "m.pt").read_bytes(), path,
                 BuildConfig("torch", "fp32"))
    return path


def _kernel_graph(header, sections) -> tuple[KernelGraph, torch.nn.Module]:
    """KernelGraph as the torch backend makes it on CUDA, here on the CPU; and the model from the engine."""
    model, _ = load_model_bytes(io.BytesIO(sections[SECTION_MODEL]), "model section")
    tensors = read_kernel_section(sections[SECTION_KERNELS])
    return KernelGraph(tensors, header.scoring, flow_inputs(model, "fp32"), "fp32").eval(), model


def _check(kernel_graph, model, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref_map, ref_score = model(x)
        graph_map, graph_score = InferenceGraph(model).eval()(x)
        amap, score = kernel_graph(x)
    assert amap.shape == ref_map.shape == (len(x), *model.config.input_size)
    assert (amap - graph_map).abs().max() <= TOL and (score - graph_score).abs().max() <= TOL
    assert (amap - ref_map).abs().max() <= TOL and (score - ref_score).abs().max() <= TOL


def test_torch_engine_carries_the_kernels_section_and_scoring(torch_engine):
    header, sections = read_engine(torch_engine)
    assert header.backend == "torch" and header.scoring is not None
    assert set(sections) == {SECTION_MODEL, SECTION_KERNELS}
    assert header.scoring.shapes == ((16, 24), (8, 12), (4, 6), (2, 3)) and header.scoring.size == (64, 96)


def test_kernel_path_from_the_engine_sections_matches_the_reference(torch_engine):
    header, sections = read_engine(torch_engine)
    kernel_graph, model = _kernel_graph(header, sections)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(11))
    _check(kernel_graph, model, x)


def test_kernel_path_from_the_engine_sections_on_a_real_mtd_image(torch_engine):
    folder = MTD / "test" / "blowhole"
    if not folder.is_dir():
        pytest.skip(f"MTD is not at {MTD} (set LINEFLOW_MTD): the real-image check needs it")
    header, sections = read_engine(torch_engine)
    kernel_graph, model = _kernel_graph(header, sections)
    frames = [read_image(p) for p in images_in(folder)[:2]]
    _check(kernel_graph, model, torch.from_numpy(frames_to_input(frames, header.input_size)))


def _one_line_refusal(call) -> str:
    with pytest.raises(EngineFileError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "rebuild" in message, message
    return message


def test_damaged_kernels_section_is_refused_in_one_line(torch_engine):
    header, sections = read_engine(torch_engine)
    data = sections[SECTION_KERNELS]
    _one_line_refusal(lambda: read_kernel_section(data[: len(data) // 2]))  # cut
    _one_line_refusal(lambda: read_kernel_section(b"not a section"))
    buf = io.BytesIO()
    np.savez(buf, scales=np.array([object()], dtype=object))  # an object array: refused unread, never unpickled
    _one_line_refusal(lambda: read_kernel_section(buf.getvalue()))
    bomb = io.BytesIO()  # 1 GiB of zeros compressed to about 1 MB: refused by its declared size, never inflated
    np.savez_compressed(bomb, scales=np.zeros(1 << 28, dtype=np.float32))
    assert "declares" in _one_line_refusal(lambda: read_kernel_section(bomb.getvalue()))

    model, _ = load_model_bytes(io.BytesIO(sections[SECTION_MODEL]), "model section")
    tensors = read_kernel_section(data)

    def graph_of(edited):
        return lambda: KernelGraph(edited, header.scoring, flow_inputs(model, "fp32"))
    assert "lacks 1.2.w2" in _one_line_refusal(graph_of({k: v for k, v in tensors.items() if k != "1.2.w2"}))
    assert "0.1.chan2" in _one_line_refusal(graph_of({**tensors, "0.1.chan2": tensors["0.1.chan2"] + 10_000}))
    assert "0.alpha_beta" in _one_line_refusal(graph_of({**tensors, "0.alpha_beta": tensors["0.alpha_beta"][1:]}))


def test_engine_missing_its_kernels_section_is_refused_in_one_line(torch_engine, tmp_path):
    header, sections = read_engine(torch_engine)
    del sections[SECTION_KERNELS]
    broken = tmp_path / "broken.engine"
    write_engine(broken, header, sections)
    message = _one_line_refusal(lambda: engine.load(broken))
    assert "lacks its section kernels" in message


def _as_format_7(path, out) -> None:
    """The torch engine as format 7 wrote it: no kernels section, no scoring."""
    from dataclasses import replace
    header, sections = read_engine(path)
    write_engine(out, replace(header, scoring=None), {SECTION_MODEL: sections[SECTION_MODEL]})
    blob = bytearray(out.read_bytes())
    struct.pack_into("<I", blob, 8, 7)
    blob[-32:] = hashlib.sha256(bytes(blob[:-32])).digest()
    out.write_bytes(bytes(blob))


def test_older_torch_engine_runs_on_a_cpu_and_asks_for_a_rebuild_on_cuda(torch_engine, tmp_path, monkeypatch):
    old = tmp_path / "v7.engine"
    _as_format_7(torch_engine, old)
    x = np.random.default_rng(2).random((1, 3, 64, 96), dtype=np.float32)
    with engine.load(old) as loaded, engine.load(torch_engine) as current:
        assert np.array_equal(loaded.infer_prepared(x)[1], current.infer_prepared(x)[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    message = _one_line_refusal(lambda: engine.load(old))
    assert "format 8" in message and "python -m engine.build" in message
