"""GPU benchmark of the CUDA path (run on a machine with an NVIDIA GPU; not part of CI, which has none).

    python -m benchmarks.gpu_bench [--out results.json] [--backbones efficientnet_lite0 resnet18]

Measures, in one run on one card: the ceilings (device-to-device copy bandwidth, bf16 GEMM rate);
each fused kernel against the eager PyTorch/cuDNN sequence it replaces and against its floor
(max of FLOPs / GEMM rate and bytes / bandwidth); the kernel path against the folded graph
(max |diff| of maps and scores); end-to-end frames/s at batch 1, 32 and 128 for the eager graph
(fp32; bf16 autocast + channels-last) and the kernel path (bf16; fp32) captured in CUDA graphs.
Models are FastFlow at 256 px with 8 steps, hidden ratio 1.0, 3x3/1x1 alternating, lineflow's
default scales, random weights (speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from benchmarks import stages
from engine.backends.cuda import CudaGraphRunner, KernelGraph
from engine.builder.graph import FoldedStep, InferenceGraph
from engine.builder.kernel_pack import kernel_graph
from kernels.coupling import conv_coupling, conv_relu
from kernels.scoring import score_maps
from train.model import FastFlow, FlowConfig


def median_ms(fn, graph: bool = True) -> float:
    """Median of repeated runs: replays of a captured CUDA graph (no launch gaps) or plain launches."""
    if graph:
        return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def ceilings() -> dict:
    n = 1 << 28
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    t_copy = median_ms(lambda: dst.copy_(src), graph=False)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t_mm = median_ms(lambda: a @ b, graph=False)
    a32, b32 = a.float(), b.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    t_mm32 = median_ms(lambda: a32 @ b32, graph=False)
    return {"copy_GBps": 8 * n / t_copy / 1e6, "bf16_TFLOPs": 2 * 8192**3 / t_mm / 1e9,
            "fp32_TFLOPs": 2 * 8192**3 / t_mm32 / 1e9}


def make_model(backbone: str) -> FastFlow:
    return stages.make_model(FlowConfig(backbone=backbone, input_size=256, flow_steps=8))


def floor_ms(flops: float, nbytes: float, ceil: dict) -> tuple[float, str]:
    t_flop, t_byte = flops / ceil["bf16_TFLOPs"] / 1e9, nbytes / ceil["copy_GBps"] / 1e6
    return max(t_flop, t_byte), ("FLOPs" if t_flop >= t_byte else "bytes")


def eager_step(step: FoldedStep, x: torch.Tensor) -> torch.Tensor:
    """The folded step on the state as one tensor, its halves drawn by channel gathers: the eager sequence the two
    kernels replace (the exported graph draws them by 1x1 convolutions instead, FoldedStep.on_blocks)."""
    x1 = x.index_select(1, step.idx1)
    return torch.cat([x1, step.coupled(x1, x.index_select(1, step.idx2))], dim=1)


def time_step(step: FoldedStep, pstep, x0: torch.Tensor, ceil: dict) -> dict:
    """One coupling step: each kernel alone and against its floor, and the eager step (bf16 autocast)."""
    batch = x0.shape[0]
    c, h, w = x0.shape[1:]
    hw, m = h * w, batch * h * w
    hid = torch.empty((batch, pstep.hidden, h, w), dtype=torch.bfloat16, device="cuda")
    k1, n1 = pstep.w1.shape
    k2, n2 = pstep.w2.shape
    c1, c2 = len(pstep.chan1), len(pstep.chan2)
    x = x0.clone()
    t_relu = median_ms(lambda: conv_relu(x, pstep.chan1, pstep.w1, pstep.bias1, pstep.kernel, out=hid))
    # the coupling writes x2 in place: each replay restores x first; the copy is timed alone and subtracted
    t_copy = median_ms(lambda: x.copy_(x0))

    def couple():
        x.copy_(x0)
        conv_coupling(hid, pstep.w2, pstep.b2, pstep.g2, pstep.a2, pstep.c2, pstep.chan2, x, pstep.kernel,
                      pstep.clamp, pstep.clamp_factor, pstep.hidden_chan)
    t_couple = median_ms(couple) - t_copy
    xc = x0.clone().contiguous(memory_format=torch.channels_last)

    def eager():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return eager_step(step, xc)
    t_eager = median_ms(eager)
    f1, b1 = 2 * m * k1 * n1, m * c1 * 4 + k1 * n1 * 2 + n1 * hw * 4 + m * n1 * 2
    f2, b2 = 2 * m * k2 * n2, m * n1 * 2 + k2 * n2 * 2 + 2 * m * c2 * 4
    fl1, lim1 = floor_ms(f1, b1, ceil)
    fl2, lim2 = floor_ms(f2, b2, ceil)
    return {"kernel": pstep.kernel, "hw": f"{h}x{w}", "c": c, "conv_relu_ms": t_relu, "conv_relu_floor_ms": fl1,
            "conv_relu_bound": lim1, "coupling_ms": t_couple, "coupling_floor_ms": fl2, "coupling_bound": lim2,
            "eager_step_bf16_ms": t_eager, "eager_over_kernels": t_eager / (t_relu + t_couple)}


def kernel_rows(graph: InferenceGraph, kg: KernelGraph, batch: int, ceil: dict, name: str) -> list[dict]:
    """Per scale, steps 0 (3x3) and 1 (1x1): each kernel vs the eager step; then the scoring."""
    rows = []
    images = torch.rand(batch, 3, 256, 256, device="cuda")
    with torch.no_grad():
        feats = kg.features(images)
        states = []
        for (key, scale), packed, f in zip(graph.scales.items(), kg.scales, feats):
            x0 = F.layer_norm(f, packed.norm_shape).contiguous()
            for i in (0, 1):
                rows.append({"model": name, "batch": batch, "scale": int(key), "step": i,
                             **time_step(scale.steps[i], packed.steps[i], x0, ceil)})
            states.append(packed(f))
        ab, off = [s.alpha_beta for s in kg.scales], [s.offset for s in kg.scales]
        rr, rc = [s.resize_rows for s in kg.scales], [s.resize_cols for s in kg.scales]
        t_score = median_ms(lambda: score_maps(states, ab, off, rr, rc, kg.map_weights, kg.image_weights, kg.size))
        two = kg.map_weights != kg.image_weights
        s_bytes = sum(z.numel() * 4 for z in states) + batch * 256 * 256 * 4 * (2 if two else 1)
        s_floor, s_lim = floor_ms(0, s_bytes, ceil)

        def eager_score():  # the graph's per-scale NLL, upsample, mean and blur, on the same states
            maps = {}
            for key, z, pk in zip(graph.scales, states, kg.scales):
                c = z.shape[1]
                q = (z * pk.alpha_beta[:c].view(1, -1, 1, 1) + pk.alpha_beta[c:].view(1, -1, 1, 1)).pow(2).sum(
                    dim=1, keepdim=True) - pk.offset
                maps[int(key)] = F.interpolate(q, size=(256, 256), mode="bilinear", align_corners=False)
            return graph.fuse(maps)
        t_score_eager = median_ms(eager_score)
        rows.append({"model": name, "batch": batch, "scale": "all", "step": "scoring", "score_ms": t_score,
                     "score_floor_ms": s_floor, "score_bound": s_lim, "eager_score_ms": t_score_eager,
                     "eager_over_kernels": t_score_eager / t_score})
    return rows


def end_to_end(model: FastFlow, graph: InferenceGraph, name: str, batches: list[int]) -> list[dict]:
    rows = []
    variants = {"eager fp32": lambda: graph, "eager bf16 autocast": None,
                "kernels bf16 + CUDA graph": lambda: CudaGraphRunner(kernel_graph(model, "bf16").cuda().eval())}
    for batch in batches:
        images = torch.rand(batch, 3, 256, 256, device="cuda")
        for label, make in variants.items():
            if make is None:
                g = graph

                def run(g=g, x=images.contiguous(memory_format=torch.channels_last)):
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        return g(x)
            else:
                mod = make()

                def run(mod=mod, x=images):
                    with torch.no_grad():
                        return mod(x)
            t = median_ms(run, graph=False)
            rows.append({"model": name, "batch": batch, "variant": label, "ms": t, "frames_per_s": batch / t * 1e3})
            torch.cuda.empty_cache()
    return rows


def stage_split(kg: KernelGraph, name: str, batch: int) -> dict:
    """One batch size: backbone, flow (all scales' steps), scoring and the whole, each replayed in a CUDA graph."""
    images = torch.rand(batch, 3, 256, 256, device="cuda")
    with torch.no_grad():
        feats = kg.features(images)
        states = [scale(f) for scale, f in zip(kg.scales, feats)]
        ab = [s.alpha_beta for s in kg.scales]
        off = [s.offset for s in kg.scales]
        rr, rc = [s.resize_rows for s in kg.scales], [s.resize_cols for s in kg.scales]
        row = {"model": name, "batch": batch,
               "backbone_ms": median_ms(lambda: kg.features(images)),
               "flow_ms": median_ms(lambda: [scale(f) for scale, f in zip(kg.scales, feats)]),
               "scoring_ms": median_ms(lambda: score_maps(states, ab, off, rr, rc, kg.map_weights, kg.image_weights,
                                                          kg.size)),
               "whole_ms": median_ms(lambda: kg(images))}
    print(f"| {name} | {batch} | {row['backbone_ms']:.3f} | {row['flow_ms']:.3f} | {row['scoring_ms']:.3f} | "
          f"{row['whole_ms']:.3f} |", flush=True)
    return row


def accuracy(model: FastFlow, graph: InferenceGraph, name: str) -> list[dict]:
    images = torch.rand(8, 3, 256, 256, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out = []
    with torch.no_grad():
        ref_map, ref_score = graph(images)
        for prec in ("fp32", "bf16"):
            amap, score = kernel_graph(model, prec).cuda().eval()(images)
            out.append({"model": name, "precision": prec, "max_map_diff": float((amap - ref_map).abs().max()),
                        "max_score_diff": float((score - ref_score).abs().max()),
                        "map_range": float(ref_map.abs().max()), "score_range": float(ref_score.abs().max())})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_bench.json")
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32, 128])
    p.add_argument("--kernel-batch", type=int, default=32)
    p.add_argument("--stages-only", action="store_true", help="only the per-stage split (backbone, flow, scoring)")
    args = p.parse_args()
    if args.stages_only:
        print("| model | batch | backbone ms | flow ms | scoring ms | whole (CUDA graph) ms |")
        print("|---|---|---|---|---|---|")
        rows = []
        for name in args.backbones:
            kg = kernel_graph(make_model(name), "bf16").cuda().eval()
            rows += [stage_split(kg, name, batch) for batch in args.batches]
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "stages": rows}, f, indent=1)
        return
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["ceilings"] = ceil = ceilings()
    print(json.dumps(result), flush=True)
    result["accuracy"], result["kernels"], result["end_to_end"] = [], [], []
    for name in args.backbones:
        model = make_model(name)
        graph = InferenceGraph(model).cuda().eval()
        result["accuracy"] += accuracy(model, graph, name)
        torch.backends.cudnn.allow_tf32 = True
        result["kernels"] += kernel_rows(graph, kernel_graph(model, "bf16").cuda().eval(), args.kernel_batch, ceil,
                                         name)
        result["end_to_end"] += end_to_end(model, graph, name, args.batches)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print_tables(result)


def print_tables(result: dict) -> None:
    c = result["ceilings"]
    print(f"\n{result['device']}: copy {c['copy_GBps']:.0f} GB/s, bf16 GEMM {c['bf16_TFLOPs']:.0f} TFLOP/s, "
          f"fp32 GEMM {c['fp32_TFLOPs']:.0f} TFLOP/s")
    print("\n| model | batch | variant | ms | frames/s |\n|---|---|---|---|---|")
    for r in result["end_to_end"]:
        print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['frames_per_s']:.0f} |")
    print("\n| model | scale | step | k | conv_relu us (floor, bound) | coupling us (floor, bound) | eager step us | "
          "eager/kernels |\n|---|---|---|---|---|---|---|---|")
    for r in result["kernels"]:
        if r["step"] == "scoring":
            print(f"| {r['model']} | all | scoring | | {r['score_ms'] * 1e3:.1f} ({r['score_floor_ms'] * 1e3:.1f}, "
                  f"{r['score_bound']}) | | {r['eager_score_ms'] * 1e3:.1f} | {r['eager_over_kernels']:.2f} |")
        else:
            print(f"| {r['model']} | {r['scale']} {r['hw']}x{r['c']} | {r['step']} | {r['kernel']} | "
                  f"{r['conv_relu_ms'] * 1e3:.1f} ({r['conv_relu_floor_ms'] * 1e3:.1f}, {r['conv_relu_bound']}) | "
                  f"{r['coupling_ms'] * 1e3:.1f} ({r['coupling_floor_ms'] * 1e3:.1f}, {r['coupling_bound']}) | "
                  f"{r['eager_step_bf16_ms'] * 1e3:.1f} | {r['eager_over_kernels']:.2f} |")
    frac = [r["conv_relu_floor_ms"] / r["conv_relu_ms"] for r in result["kernels"] if r["step"] != "scoring"]
    print(f"\nconv_relu fraction of floor: median {statistics.median(frac):.2f}")
    for r in result["accuracy"]:
        print(r)


if __name__ == "__main__":
    main()
