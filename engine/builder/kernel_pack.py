"""The CUDA path's kernels section: the folded flow as the kernels read it (engine/backends/cuda.py reads it).

Per scale the Triton kernels keep the state X (B, C, h, w) in one buffer: y2 overwrites x2, so the logical
channel j of a step lives at a physical channel that moves as the flow permutes its channels. The build tracks
it here once: per step the index tables chan1 / chan2 (physical channels of x1 and x2) beside the step's
folded weights (engine/builder/graph.py: w1, the constant bias map, w2, b2, g2, a2, c2, the clamp), per scale
alpha and beta in physical order, the offset and the norm's shape. The GEMM weights stay as the graph folds
them, in fp32: packing them casts to the run precision (kernels.coupling.pack_conv_weight), which the run side
chooses when it loads.

The section is a numpy .npz of plain arrays (np.load with allow_pickle=False reads it: nothing in it runs):

    scales                  (S,) int64    the backbone scale each flow scale reads, in the graph's order
    steps                   (S,) int64    coupling steps a scale
    {i}.norm_shape          (3,) int64    (C, h, w) of scale i
    {i}.alpha_beta          (2C,) f32     alpha, then beta, physical order
    {i}.offset              () f64
    {i}.{j}.w1              (hidden, c1, k, k) f32        {i}.{j}.bias1  (hidden, h, w) f32
    {i}.{j}.w2              (2 c2, hidden, k, k) f32      {i}.{j}.b2     (2 c2,) f32
    {i}.{j}.g2, a2, c2      (c2,) f32                     {i}.{j}.chan1 (c1,), chan2 (c2,) int32
    {i}.{j}.clamp, clamp_factor  () f64
"""

from __future__ import annotations

import io

import numpy as np
import torch

from engine.builder.graph import FoldedScale, InferenceGraph

__all__ = ["kernel_arrays", "kernel_section", "kernel_graph"]


def _np(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def _scale_arrays(i: int, scale: FoldedScale) -> dict[str, np.ndarray]:
    channels = scale.norm_shape[0]
    phys = torch.arange(channels)  # physical channel of each stored channel of the graph
    out = {f"{i}.norm_shape": np.array(scale.norm_shape, np.int64), f"{i}.offset": np.array(scale.offset, np.float64)}
    for j, step in enumerate(scale.steps):
        idx1, idx2 = step.idx1.cpu(), step.idx2.cpu()
        out.update({f"{i}.{j}.chan1": _np(phys[idx1], np.int32), f"{i}.{j}.chan2": _np(phys[idx2], np.int32),
                    f"{i}.{j}.w1": _np(step.w1), f"{i}.{j}.bias1": _np(step.bias_map1[0]),
                    f"{i}.{j}.w2": _np(step.w2), f"{i}.{j}.b2": _np(step.b2),
                    f"{i}.{j}.g2": _np(step.g2.flatten()), f"{i}.{j}.a2": _np(step.a2.flatten()),
                    f"{i}.{j}.c2": _np(step.c2.flatten()),
                    f"{i}.{j}.clamp": np.array(step.clamp, np.float64),
                    f"{i}.{j}.clamp_factor": np.array(step.clamp_factor, np.float64)})
        phys = torch.cat([phys[idx1], phys[idx2]])
    alpha, beta = torch.empty(channels), torch.empty(channels)
    alpha[phys], beta[phys] = scale.alpha.flatten().cpu(), scale.beta.flatten().cpu()
    out[f"{i}.alpha_beta"] = _np(torch.cat([alpha, beta]))
    return out


def kernel_arrays(graph: InferenceGraph) -> dict[str, np.ndarray]:
    """The section's arrays, by name (the layout above)."""
    out = {"scales": np.array([int(k) for k in graph.scales], np.int64),
           "steps": np.array([len(scale.steps) for scale in graph.scales.values()], np.int64)}
    for i, scale in enumerate(graph.scales.values()):
        out.update(_scale_arrays(i, scale))
    return out


def kernel_section(graph: InferenceGraph) -> bytes:
    """The section's bytes (engine.header.SECTION_KERNELS of a torch engine)."""
    buf = io.BytesIO()
    np.savez(buf, **kernel_arrays(graph))
    return buf.getvalue()


def kernel_graph(model, precision: str = "fp32"):
    """The CUDA path's KernelGraph of `model` as a torch engine loads it (its section, its header's scoring, the
    feature module engine/backends/pytorch.py hands in): for the tests and the GPU benchmarks."""
    from engine.backends.cuda import KernelGraph, read_kernel_section
    from engine.backends.pytorch import flow_inputs
    graph = InferenceGraph(model).eval()
    return KernelGraph(read_kernel_section(kernel_section(graph)), graph.scoring_spec(),
                       flow_inputs(model, precision), precision)
