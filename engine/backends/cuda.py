"""The CUDA run path: backbone in cuDNN, flow and scoring through the fused Triton kernels, one CUDA graph per batch.

KernelGraph packs an InferenceGraph (engine/builder/graph.py) for kernels/: per coupling step the GEMM
weights in the run precision and the index tables that fold the channel gathers away (y2 overwrites
x2 in the scale's state buffer, so the physical channel of each logical channel is tracked here at
pack time), per scale alpha/beta in physical channel order and the resize-and-blur matrices of its
rows and columns (Rr, Rc: kernels/scoring.py).
It also runs on the CPU under TRITON_INTERPRET=1, which is how the tests check it against the graph.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.builder.graph import InferenceGraph
from engine.common.maths import resize_blur_matrix
from kernels.coupling import conv_coupling, conv_relu, pack_conv_weight
from kernels.scoring import score_maps
from train.maps import top_k_mean
from train.model import pool_features

__all__ = ["KernelGraph", "CudaGraphRunner", "RUN_DTYPES"]

RUN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _PackedStep(nn.Module):
    def __init__(self, step, phys: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.kernel, self.clamp, self.clamp_factor = step.kernel, float(step.clamp), float(step.clamp_factor)
        self.hidden = step.w1.shape[0]
        self.register_buffer("chan1", phys[step.idx1].int())
        self.register_buffer("chan2", phys[step.idx2].int())
        self.register_buffer("hidden_chan", torch.arange(self.hidden, dtype=torch.int32, device=phys.device))
        self.register_buffer("w1", pack_conv_weight(step.w1, dtype))
        self.register_buffer("bias1", step.bias_map1[0].float().contiguous())
        self.register_buffer("w2", pack_conv_weight(step.w2, dtype))
        self.register_buffer("b2", step.b2.float().contiguous())
        self.register_buffer("g2", step.g2.flatten().float().contiguous())
        self.register_buffer("a2", step.a2.flatten().float().contiguous())
        self.register_buffer("c2", step.c2.flatten().float().contiguous())

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> None:
        conv_relu(x, self.chan1, self.w1, self.bias1, self.kernel, out=hidden)
        conv_coupling(hidden, self.w2, self.b2, self.g2, self.a2, self.c2, self.chan2, x, self.kernel, self.clamp,
                      self.clamp_factor, self.hidden_chan)


class _PackedScale(nn.Module):
    def __init__(self, scale, size: tuple[int, int], sigma: float, dtype: torch.dtype):
        super().__init__()
        channels, h, w = scale.norm_shape
        self.norm_shape, self.offset, self.dtype = scale.norm_shape, float(scale.offset), dtype
        device = scale.alpha.device
        phys = torch.arange(channels, device=device)  # physical channel of each stored channel of the graph
        steps = []
        for step in scale.steps:
            steps.append(_PackedStep(step, phys, dtype))
            phys = torch.cat([phys[step.idx1], phys[step.idx2]])
        self.steps = nn.ModuleList(steps)
        alpha, beta = torch.empty(channels, device=device), torch.empty(channels, device=device)
        alpha[phys], beta[phys] = scale.alpha.flatten(), scale.beta.flatten()
        self.register_buffer("alpha_beta", torch.cat([alpha, beta]).float())
        # R = blur @ upsample along each axis (engine/common/maths.py): (H, h) for the rows, (W, w) for the columns
        for name, n_in, n_out in (("resize_rows", h, size[0]), ("resize_cols", w, size[1])):
            resize = resize_blur_matrix(n_in, n_out, sigma)
            self.register_buffer(name, torch.tensor(resize, dtype=torch.float32, device=device))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(feat.float(), self.norm_shape).contiguous()
        hidden = None
        for step in self.steps:
            if hidden is None or hidden.shape[1] != step.hidden:
                hidden = torch.empty((x.shape[0], step.hidden, *x.shape[2:]), dtype=self.dtype, device=x.device)
            step(x, hidden)
        return x


class KernelGraph(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (map (B, H, W), score (B,)), as InferenceGraph, via kernels/."""

    def __init__(self, graph: InferenceGraph, precision: str = "fp32"):
        super().__init__()
        if precision not in RUN_DTYPES:
            raise ValueError(f"precision must be one of {sorted(RUN_DTYPES)}, not {precision!r}")
        self.precision, dtype = precision, RUN_DTYPES[precision]
        self.backbone, self.pool, self.pooled, self.size = graph.backbone, graph.pool, graph.pooled, tuple(graph.size)
        self.keys = [int(k) for k in graph.scales]
        self.scales = nn.ModuleList(_PackedScale(graph.scales[str(k)], graph.size, graph.sigmas[k], dtype)
                                    for k in self.keys)
        spec = graph.scoring_spec()  # the same fusion weights the CPU engines' native scoring uses
        self.map_weights, self.image_weights, self.top_k = spec.map_weights, spec.image_weights, spec.top_k

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone (bf16/fp16 autocast and channels-last on CUDA unless fp32), then the neighbourhood pool."""
        low = self.precision != "fp32" and images.is_cuda
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=RUN_DTYPES[self.precision], enabled=low):
            feats = self.backbone(images)
        return pool_features([feats[k].float() for k in self.keys], self.pool, self.pooled)

    def maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly map, the map the image score reads) (B, H, W): one tensor twice when they read the same scales."""
        states = [scale(f) for scale, f in zip(self.scales, self.features(images))]
        return score_maps(states, [s.alpha_beta for s in self.scales], [s.offset for s in self.scales],
                          [s.resize_rows for s in self.scales], [s.resize_cols for s in self.scales],
                          self.map_weights, self.image_weights, self.size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, score_map = self.maps(images)
        return amap, top_k_mean(score_map, self.top_k)


class CudaGraphRunner:
    """Runs a module on fixed-shape CUDA inputs by replaying one captured CUDA graph per batch size.

    The graphs' input and output buffers are static, so a call holds a lock from the copy in to the copy out,
    and returns copies: two threads on one runner never see each other's buffers."""

    def __init__(self, module: nn.Module, warmup: int = 3):
        self.module, self.warmup = module, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = {}
        self.lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple:
        with self.lock:
            return tuple(t.clone() for t in self._replay(images))

    def _replay(self, images: torch.Tensor) -> tuple:
        key = tuple(images.shape)
        if key not in self.graphs:
            static_in = images.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # autotuning and cuDNN's algorithm search happen here, not in capture
                for _ in range(self.warmup):
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(images)
        graph.replay()
        return static_out
