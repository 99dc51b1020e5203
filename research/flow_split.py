"""What a flow split between OpenVINO and code of our own would pay: the default model's 3x3 coupling subnets
(conv 3x3, ReLU, conv 3x3: the flow's arithmetic) compiled as OpenVINO graphs two ways, per scale:

    python research/flow_split.py [--precision bf16|fp32] [--calls 200]

- chained: the scale's four 3x3 subnets in one graph (what any graph that keeps them pays for their arithmetic);
- one call each: each subnet its own graph, called from Python (what a hybrid flow pays, with OpenVINO running
  the 3x3 subnets and a fused kernel of ours the selections, 1x1 steps and element-wise tails between them);
- an identity graph: the floor of one OpenVINO call from Python.

Random weights (the time does not depend on them), batch 1, all threads, the latency hint, as
engine.backends.ov compiles. Also prints the flow's convolution FLOPs (torch's counter), for the floor at a
measured GEMM rate (`python -m benchmarks.stages`).
"""
import argparse
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import openvino as ov
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.backends import default_threads  # noqa: E402
from engine.backends.ov import compile_config  # noqa: E402
from train.model import FastFlow, FlowConfig  # noqa: E402

core = ov.Core()


def compiled(module: nn.Module, shape: tuple[int, ...], precision: str):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.randn(shape), buffer, dynamo=False)
    return core.compile_model(core.read_model(buffer.getvalue(), b""), "CPU",
                              compile_config(default_threads(None), precision))


class Chained(nn.Module):
    """The scale's 3x3 subnets back to back; the first half of each output feeds the next (shapes as in the flow)."""

    def __init__(self, subnets: list[nn.Module], c1: int):
        super().__init__()
        self.subnets, self.c1 = nn.ModuleList(subnets), c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for subnet in self.subnets:
            x = subnet(x)[:, :self.c1]
        return x


def median_ms(call, calls: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    model = FastFlow(FlowConfig()).eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, *model.config.input_size))
    chained_total = separate_total = flops = 0.0
    for feat, steps in zip(feats, model.flows, strict=True):
        shape = (1, steps[0].c1, *feat.shape[2:])
        subnets = [s.subnet for s in steps if s.subnet[0].kernel_size[0] == 3]
        for s in steps:
            for conv in (s.subnet[0], s.subnet[2]):
                flops += 2 * conv.weight.numel() * feat.shape[2] * feat.shape[3]
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        chain = compiled(Chained(subnets, steps[0].c1), shape, args.precision).create_infer_request()
        one = [compiled(s, shape, args.precision).create_infer_request() for s in subnets]
        chained = median_ms(lambda: chain.infer({0: x}), args.calls)  # noqa: B023 (called here, in this loop)
        separate = sum(median_ms(lambda r=r: r.infer({0: x}), args.calls) for r in one)  # noqa: B023
        print(f"scale {tuple(feat.shape[1:])}: {len(subnets)} 3x3 subnets chained {chained:.3f} ms, "
              f"one call each {separate:.3f} ms")
        chained_total, separate_total = chained_total + chained, separate_total + separate
    identity = compiled(nn.Identity(), (1, 12, 8, 8), "fp32").create_infer_request()
    zeros = np.zeros((1, 12, 8, 8), np.float32)
    print(f"all scales ({args.precision}): chained {chained_total:.2f} ms, one call each {separate_total:.2f} ms; "
          f"an identity graph's call {median_ms(lambda: identity.infer({0: zeros}), args.calls) * 1e3:.0f} us; "
          f"the flow's convolutions {flops / 1e9:.3f} GFLOP")


if __name__ == "__main__":
    main()
