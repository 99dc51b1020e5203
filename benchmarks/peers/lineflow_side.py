"""lineflow's side of the peers benchmark; run by run_peers.py with lineflow's own venv. Prints one JSON line.

Times lineflow's resnet18 configuration (random weights) as PyTorch eager and as onnxruntime fp32 / openvino
fp32 / bf16-flow / bf16-deep / bf16 engines (2 threads), and the default model (auto, and bf16-deep), at batch 1
and 8 on random (B, 3, 256, 256) float32 inputs in [0, 1].
"""

import contextlib
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from timing import time_calls

from engine.backends import load_backend
from engine.builder import BuildConfig, build_engine
from engine.format import read_engine
from train.checkpoint import save_model
from train.model import FastFlow, FlowConfig

THREADS, BATCHES = 2, (1, 8)


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(backbone="resnet18", input_size=256, flow_steps=8, hidden_ratio=1.0)).eval()
    meta = {"threshold": {"threshold": 1.0}}
    runners = {"torch eager": lambda x: model(torch.from_numpy(x))}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        path = Path(tmp) / "model.pt"
        save_model(path, model, meta)
        for backend, precision in (("openvino", "fp32"), ("openvino", "bf16-flow"), ("openvino", "bf16-deep"),
                                   ("openvino", "bf16"), ("onnxruntime", "fp32")):
            out = Path(tmp) / f"{backend}-{precision}.engine"
            try:  # bf16 exists only where the CPU runs it natively (the build refuses it elsewhere)
                build_engine(model, meta, path.read_bytes(), out, BuildConfig(backend, precision))
            except Exception as e:  # noqa: BLE001 - a precision this CPU lacks: its row is left out, and said so
                print(f"lineflow {backend} {precision}: not built here ({e})", file=sys.stderr)
                continue
            runners[f"{backend} {precision}"] = load_backend(
                *read_engine(out), THREADS).infer
        # default against default: lineflow's default model (efficientnet_lite2) as `engine.build` builds it
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: benchmarks.stages
        from benchmarks.stages import build_default_engine
        (Path(tmp) / "default").mkdir()
        header, sections = read_engine(build_default_engine(Path(tmp) / "default"))
        runners[f"default model (lite2), {header.backend} {header.precision}"] = load_backend(
            header, sections, THREADS).infer
        # what auto picks with real check images on a bf16 CPU (it tries bf16-deep only on real ones): named here
        try:
            header, sections = read_engine(build_default_engine(Path(tmp) / "default", name="deep.engine",
                                                                precision="bf16-deep"))
            runners["default model (lite2), openvino bf16-deep"] = load_backend(header, sections, THREADS).infer
        except Exception as e:  # noqa: BLE001 - no bf16 here, or outside tolerance on random images: said so
            print(f"lineflow default model openvino bf16-deep: not built here ({e})", file=sys.stderr)
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)
        for backend, run in runners.items():
            rows.append({"implementation": "lineflow", "backend": backend, "batch": batch,
                         "calls_ms": time_calls(run, x)})
    versions = {p: version(p) for p in ("torch", "onnxruntime", "openvino", "onnx")}
    import openvino as ov
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    cpu = f"{ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}; OpenVINO capabilities {', '.join(caps)}"
    print(json.dumps({"versions": versions, "cpu": cpu, "rows": rows}))


if __name__ == "__main__":
    main()
