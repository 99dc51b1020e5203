"""Where OpenVINO spends a frame: per-node perf counters of the engine's maps graph, grouped by part and op type.

    python -m benchmarks.profile_ov [--config "resnet18 (paper)"] [--precision fp32] [--gathers]

The configuration's model with random weights (benchmarks/stages.py; no cost depends on the values), the
maps graph as the engine exports it (engine/builder/export.py), compiled as the OpenVINO backend compiles it
(static batch 1, latency hint, torch's threads); PERF_COUNT on, real time summed per node over `--calls`
calls and divided by them. Parts by node name: backbone, each flow scale (the folded couplings), other.
`--gathers` exports the flow as it was before 2026-12-02, each scale's state one tensor and each step's halves
drawn by Gather nodes (GatherScale below: this benchmark's own variant; the engine exports 1x1 convolutions).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.stages import CONFIGS, make_model
from engine.backends.ov import compile_config
from engine.builder.export import export_onnx
from engine.builder.graph import FoldedScale, InferenceGraph


class GatherScale(nn.Module):
    """A folded scale with its state as one tensor: each step gathers its halves by channel index (Gather nodes)
    and concatenates [x1, y2] (the graph before 2026-12-02; the same maps as FoldedScale's two blocks)."""

    def __init__(self, scale: FoldedScale):
        super().__init__()
        self.scale = scale

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        s = self.scale
        x = F.layer_norm(feat, s.norm_shape)
        for step in s.steps:
            x1 = x.index_select(1, step.idx1)
            x = torch.cat([x1, step.coupled(x1, x.index_select(1, step.idx2))], dim=1)
        return (x * s.alpha + s.beta).pow(2).sum(dim=1, keepdim=True) - s.offset  # (B, 1, h, w)


def profile(config_name: str, precision: str, calls: int, gathers: bool) -> tuple[float, dict, dict]:
    import openvino as ov
    graph = InferenceGraph(make_model(CONFIGS[config_name])).eval()
    if gathers:
        for key in list(graph.scales):
            graph.scales[key] = GatherScale(graph.scales[key])
    onnx = export_onnx(graph, 1, "maps")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(onnx, b""), "CPU",
                                  compile_config(torch.get_num_threads(), precision, PERF_COUNT=True))
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).random((1, 3, *graph.size), dtype=np.float32)
    for _ in range(3):
        request.infer({0: x})
    by_part: dict[str, float] = defaultdict(float)
    by_type: dict[tuple[str, str], float] = defaultdict(float)
    wall = []
    import time
    for _ in range(calls):
        t0 = time.perf_counter()
        request.infer({0: x})
        wall.append(time.perf_counter() - t0)
        for info in request.profiling_info:
            us = info.real_time.total_seconds() * 1e6
            m = re.search(r"scales\.(\d+)", info.node_name)
            part = f"flow scale {m.group(1)}" if m else ("backbone" if "backbone" in info.node_name else "other")
            by_part[part] += us / calls
            by_type[part.split()[0], f"{info.node_type} ({info.exec_type})"] += us / calls
    return float(np.median(wall)) * 1e3, dict(by_part), dict(by_type)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="resnet18 (paper)", choices=list(CONFIGS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--gathers", action="store_true", help="the flow's channel gathers as Gather nodes (the graph "
                   "before 2026-12-02), not 1x1 convolutions")
    args = p.parse_args()
    wall, by_part, by_type = profile(args.config, args.precision, args.calls, args.gathers)
    total = sum(by_part.values())
    form = "Gather nodes" if args.gathers else "1x1 convolutions"
    print(f"{args.config}, {form}, OpenVINO {args.precision}, batch 1, "
          f"{torch.get_num_threads()} threads: {wall:.1f} ms a call (median), nodes' real time {total / 1e3:.1f} ms")
    for part, us in sorted(by_part.items()):
        print(f"  {part:14s} {us / 1e3:7.2f} ms  {us / total:6.1%}")
    print("by op type (top 25):")
    for (part, kind), us in sorted(by_type.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {part:9s} {kind:45s} {us / 1e3:7.2f} ms  {us / total:6.1%}")


if __name__ == "__main__":
    main()
