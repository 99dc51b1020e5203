"""The engine's stages as separate modules, their FLOPs counted from the graph, and the CPU's GEMM rate.

    python -m benchmarks.stages        # prints the floor table for the benchmarked configurations

Used by benchmarks/test_suite_speed.py (per-stage timings) and by the floor in benchmarks/NOTES.md:
FLOPs per frame of each stage are counted by torch.utils.flop_counter on the folded inference graph
(every convolution and matrix product; element-wise work is not counted), and the machine's GEMM
rate is measured with torch.mm at the precision the stage runs in; FLOPs / rate is the stage's floor.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.backends import available_backends, load_backend
from engine.builder import BuildConfig, build_engine
from engine.builder.graph import BackboneGraph, FlowGraph, InferenceGraph
from engine.format import read_engine
from train.checkpoint import save_model
from train.model import FastFlow, FlowConfig

__all__ = ["CONFIGS", "ENGINES", "make_model", "build_engines", "build_default_engine", "count_flops", "gemm_rate"]

# name -> FlowConfig: lineflow's default, and the FastFlow paper's resnet18 setting (8 steps, hidden
# ratio 1.0, 3x3/1x1 alternating, 256 px) with lineflow's default scales and scoring
CONFIGS = {
    "efficientnet_lite2 (default)": FlowConfig(),
    "efficientnet_lite0": FlowConfig(backbone="efficientnet_lite0"),
    "resnet18 (paper)": FlowConfig(backbone="resnet18", input_size=256, flow_steps=8, hidden_ratio=1.0),
}


def build_default_engine(folder: Path, config: FlowConfig | None = None, name: str = "m.engine",
                         precision: str = "auto") -> Path:
    """The default model (or `config`) with its real backbone weights and freshly initialised flow weights (speed
    does not depend on their values), built for this CPU by `--backend auto --precision auto` (or the precision
    named): the engine a user gets here, for the benchmarks that time engine.run, tiling and serving."""
    from train.backbones import create_backbone
    torch.manual_seed(0)
    model = FastFlow(config or FlowConfig()).eval()
    model.backbone = create_backbone(model.config.backbone)
    meta = {"threshold": {"threshold": 1.0}}
    save_model(folder / "model.pt", model, meta)
    build_engine(model, meta, (folder / "model.pt").read_bytes(), folder / name, BuildConfig("auto", precision))
    return folder / name


def make_model(config: FlowConfig, seed: int = 0) -> FastFlow:
    """Random weights of the right shapes (no stage's cost depends on the values); flow parameters and
    per-scale statistics moved off their initial values, so no folded constant is trivially 0 or 1 (the tests'
    models too: tests/conftest.py perturbed_model)."""
    torch.manual_seed(seed)
    model = FastFlow(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone"):
                p.add_(torch.randn_like(p) * 0.03)
        model.scale_stats.copy_(torch.tensor([[0.5, 2.0], [0.7, 3.0], [0.2, 1.5], [0.4, 2.5]]))
    return model


# the benchmarked engines, name -> (backend, precision): fp32 on both CPU runtimes, and OpenVINO's two bf16 rungs that
# `--precision auto` keeps on a bf16 CPU: bf16-deep (lightly trained models) and bf16-flow (trained ones, where it pays)
ENGINES = {name: spec for name, spec in {"onnxruntime": ("onnxruntime", "fp32"), "openvino": ("openvino", "fp32"),
                                         "openvino bf16-flow": ("openvino", "bf16-flow"),
                                         "openvino bf16-deep": ("openvino", "bf16-deep")}.items()
           if spec[0] in available_backends()}


def build_engines(model: FastFlow, folder: Path) -> dict[str, Callable[[np.ndarray], tuple]]:
    """Build each of ENGINES for `model` in `folder` (build output silenced), load it with torch's threads:
    name -> its backend's infer."""
    path = folder / "model.pt"
    meta = {"threshold": {"threshold": 1.0}}
    save_model(path, model, meta)
    out = {}
    for name, (backend, precision) in ENGINES.items():
        engine_path = folder / f"{backend}-{precision}.engine"
        with contextlib.redirect_stdout(io.StringIO()):
            build_engine(model, meta, path.read_bytes(), engine_path, BuildConfig(backend, precision))
        out[name] = load_backend(*read_engine(engine_path), torch.get_num_threads()).infer
    return out


def count_flops(config: FlowConfig) -> dict[str, float]:
    """FLOPs per frame (batch 1) of backbone and flow, counted on the folded graph."""
    graph = InferenceGraph(make_model(config)).eval()
    x = torch.rand(1, 3, *config.input_size)
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            feats = BackboneGraph(graph)(x)
        out["backbone"] = float(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            FlowGraph(graph)(*feats)
        out["flow"] = float(counter.get_total_flops())
    return out


def gemm_rate(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """GFLOP/s of an n x n x n torch.mm on this machine (torch's threads), median of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    from engine.builder.builder import openvino_capabilities
    # bf16 only where the CPU has it: elsewhere torch emulates the bf16 GEMM, minutes for one product
    precisions = ("fp32", "bf16") if "BF16" in openvino_capabilities() else ("fp32",)
    rates = {p: gemm_rate(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    print(f"GEMM 2048^3, {torch.get_num_threads()} threads: "
          + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items())
          + ("" if "bf16" in rates else " (no native bf16 on this CPU: not measured)"))
    rows = {}
    print("| configuration | stage | GFLOP/frame | " + " | ".join(f"floor ms ({p})" for p in rates) + " |\n"
          + "|---" * (3 + len(rates)) + "|")
    for name, cfg in CONFIGS.items():
        flops = count_flops(cfg)
        rows[name] = flops
        for stage, f in flops.items():
            floors = " | ".join(f"{f / rate / 1e6:.2f}" for rate in rates.values())
            print(f"| {name} | {stage} | {f / 1e9:.2f} | {floors} |")
    print(json.dumps({"gemm_GFLOPs": rates, "flops_per_frame": rows}))


if __name__ == "__main__":
    main()
