"""Engine latency and throughput per backend against the PyTorch eager reference, same run, same model.

    python -m pytest benchmarks/test_engine_speed.py --benchmark-columns=median,iqr,rounds

The model is the default configuration (efficientnet_lite2, 256 px, 8 steps, four scales); its flow
weights are untrained, which changes no cost. Batch 1 gives ms/frame; batch 8 gives frames/s.
Inputs are prepared (3, 256, 256) arrays: preprocessing is measured separately (issue 5/6).
"""

import numpy as np
import pytest
import torch

from engine.backends import available_backends, load_backend
from engine.build import build_engine
from engine.format import read_engine
from train.checkpoint import save_model
from train.model import FastFlow, FlowConfig

BACKENDS = [b for b in ("onnxruntime", "openvino") if b in available_backends()]
BATCHES = [1, 8]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    torch.manual_seed(0)
    model = FastFlow(FlowConfig()).eval()
    from train.backbones import create_backbone
    model.backbone = create_backbone(model.config.backbone)
    path = tmp_path_factory.mktemp("bench") / "model.pt"
    save_model(path, model, {"threshold": {"threshold": 1.0}})
    return model, path


@pytest.fixture(scope="module")
def engines(default_model, tmp_path_factory):
    model, path = default_model
    out = {}
    for backend in BACKENDS:
        e = tmp_path_factory.mktemp("bench") / f"{backend}.engine"
        build_engine(model, {"threshold": {"threshold": 1.0}}, path.read_bytes(), e, backend, "fp32")
        header, sections = read_engine(e)
        out[backend] = load_backend(header, sections, torch.get_num_threads())
    return out


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)


@pytest.mark.parametrize("batch", BATCHES)
def test_pytorch_eager_reference(benchmark, default_model, batch):
    model, _ = default_model
    x = torch.from_numpy(_images(batch))
    benchmark.group = f"batch {batch}"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_backend(benchmark, engines, backend, batch):
    x = _images(batch)
    benchmark.group = f"batch {batch}"
    benchmark.pedantic(engines[backend], args=(x,), rounds=10, warmup_rounds=1)
