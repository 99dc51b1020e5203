"""The inference graph: FastFlow's scoring path with every constant folded in (build side; imports torch).

Training needs log|det J| and the flow's parameters in the form the optimiser moves them; scoring
needs neither. Per scale the reference computes

    x = LayerNorm(f) * e^l + b                       (FeatureNorm)
    per step: y2 = x2 * e^clamp(s) + t; y = permute(cat(x1, y2) * e^g + h)
    map = 0.5 / C * sum_c ((z_c - mu_c) / sigma_c)^2, in units of held-out good pixels

Here the state X of a scale holds each channel in "pending affine" form: the logical channel j is
a_j * X[idx_j] + c_j. A step's global affine on x1 and every permutation only update (a, c, idx),
bookkeeping at build time; the global affine on y2 folds into the t-rows of the subnet's last conv
and the log-scale of the coupling; the pending affine of x1 folds into the first conv (scale into
its weights, shift into a constant bias map, exact at zero-padded borders); AltUB's mean and
scale, the 0.5 / C and the per-scale normalisation fold into one (A * X + B)^2 sum. What remains per
step is two channel gathers, two convolutions, one clamp and one multiply-add. The exported graph keeps X
as two blocks, [x1, y2] of the step before, and gathers each half from them by 1x1 convolutions with 0/1
weights (FoldedStep.on_blocks); the CUDA kernels index the channels instead (engine/backends/cuda.py).

The soft clamp's atan is a polynomial here (kernels.reference.poly_atan, the one the Triton kernels
use): runtimes fuse its multiply-adds into the element-wise chain around it, where OpenVINO runs an
Atan node as a scalar reference loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.common.maths import top_k_count
from engine.scoring import ScoringSpec
from kernels.reference import poly_atan
from train.maps import fuse_maps, top_k_mean
from train.model import SOFT_CLAMP_FACTOR, CouplingStep, FastFlow, pool_features, soft_clamp

__all__ = ["InferenceGraph", "ScaleMapsGraph", "BackboneGraph", "FlowGraph", "HeadGraph", "TailFlowGraph",
           "FoldedStep", "FoldedScale"]


class FoldedStep(nn.Module):
    """One coupling step on the stored state, kept as two blocks (`on_blocks`): the halves drawn from them, two
    convs, clamp, multiply-add."""

    def __init__(self, step: CouplingStep, idx: torch.Tensor, a: torch.Tensor, c: torch.Tensor, hw: tuple[int, int]):
        super().__init__()
        c1, c2 = step.c1, step.c2
        conv1, conv2 = step.subnet[0], step.subnet[2]
        self.kernel, self.clamp = conv1.kernel_size[0], step.clamp
        self.clamp_factor = SOFT_CLAMP_FACTOR  # handed to the kernels as a parameter (engine/backends/cuda.py)
        g, h = step.global_log_scale.detach(), step.global_bias.detach()
        # first conv sees x1 = a1 * X[idx1] + c1: scale into the weights, shift through the conv as a
        # constant map (zero padding makes it vary at the borders, so it is a map, not a vector)
        a1, c1_shift = a[:c1], c[:c1]
        w1 = conv1.weight.detach() * a1.view(1, -1, 1, 1)
        shift_map = F.conv2d(c1_shift.view(1, -1, 1, 1).expand(1, c1, *hw), conv1.weight.detach(),
                             conv1.bias.detach(), padding=self.kernel // 2)
        # last conv: rows [0, c2) give s, rows [c2, 2 c2) give t; fold y2's global affine into t
        w2, b2 = conv2.weight.detach().clone(), conv2.bias.detach().clone()
        e_g2 = g[c1:].exp()
        w2[c2:] *= e_g2.view(-1, 1, 1, 1)
        b2[c2:] = b2[c2:] * e_g2 + h[c1:]
        self.register_buffer("idx1", idx[:c1].clone())
        self.register_buffer("idx2", idx[c1:].clone())
        self.register_buffer("w1", w1)
        self.register_buffer("bias_map1", shift_map)  # (1, hidden, H, W)
        self.register_buffer("w2", w2)
        self.register_buffer("b2", b2)
        self.register_buffer("g2", g[c1:].view(1, -1, 1, 1).clone())
        self.register_buffer("a2", a[c1:].view(1, -1, 1, 1).clone())
        self.register_buffer("c2", c[c1:].view(1, -1, 1, 1).clone())
        self.c2_channels = c2

    def coupled(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """y2 from the step's two halves as stored (x2 before its pending affine)."""
        x2 = x2 * self.a2 + self.c2
        hidden = F.relu(F.conv2d(x1, self.w1, None, padding=self.kernel // 2) + self.bias_map1)
        c2, pad = self.c2_channels, self.kernel // 2
        # s and t as two convolutions rather than one split in two: a channel split runs as a reference kernel
        # in OpenVINO, with layout reorders around it (benchmarks/NOTES.md)
        s = F.conv2d(hidden, self.w2[:c2], self.b2[:c2], padding=pad)
        t = F.conv2d(hidden, self.w2[c2:], self.b2[c2:], padding=pad)
        return x2 * (soft_clamp(s, self.clamp, atan=poly_atan) + self.g2).exp() + t

    def make_selections(self, c1: int) -> None:
        """For the state kept as two blocks [first c1 channels, the rest]: x1 and x2 as 1x1 convolutions of the
        blocks with 0/1 weights (exact), unless they are the blocks themselves (the first step)."""
        channels = c1 + self.c2_channels
        self.direct = torch.equal(self.idx1, torch.arange(c1)) and torch.equal(self.idx2, torch.arange(c1, channels))
        if self.direct:
            return
        for name, idx in (("sel1", self.idx1), ("sel2", self.idx2)):
            onehot = torch.zeros(len(idx), channels)
            onehot[torch.arange(len(idx)), idx] = 1.0
            self.register_buffer(f"{name}_p", onehot[:, :c1, None, None].clone())
            self.register_buffer(f"{name}_q", onehot[:, c1:, None, None].clone())

    def on_blocks(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on the state as two blocks: the blocks after it, [x1, y2]. OpenVINO runs Gather, Split and
        Concat as reference kernels in plain layout, with reorders around them; 1x1 convolutions stay in its
        blocked layout, for C^2 more multiply-adds a pixel and step, which pays on the CPUs measured
        (benchmarks/NOTES.md, "Where an AVX2 CPU spends a frame; the flow's gathers as 1x1 convolutions")."""
        if self.direct:
            x1, x2 = p, q
        else:
            x1 = F.conv2d(p, self.sel1_p) + F.conv2d(q, self.sel1_q)
            x2 = F.conv2d(p, self.sel2_p) + F.conv2d(q, self.sel2_q)
        return x1, self.coupled(x1, x2)


class FoldedScale(nn.Module):
    """One scale: LayerNorm, folded steps, then the map (A * X + B)^2 summed over channels, minus m."""

    def __init__(self, model: FastFlow, s: int, hw: tuple[int, int]):
        super().__init__()
        norm, steps, base = model.norms[s], model.flows[s], model.bases[s]
        channels = norm.bias.numel()
        idx = torch.arange(channels)
        a, c = norm.log_scale.detach().exp(), norm.bias.detach().clone()
        folded = []
        for step in steps:
            folded.append(FoldedStep(step, idx, a, c, hw))
            c1 = step.c1
            g, h = step.global_log_scale.detach(), step.global_bias.detach()
            # stored order after the step: [x1 (same values), y2 (true values)]
            a_pre = torch.cat([a[:c1] * g[:c1].exp(), torch.ones(channels - c1)])
            c_pre = torch.cat([c[:c1] * g[:c1].exp() + h[:c1], torch.zeros(channels - c1)])
            # the permutation: logical j <- pre-permutation channel perm[j], stored at position perm[j]
            idx, a, c = step.perm.clone(), a_pre[step.perm], c_pre[step.perm]
        self.steps = nn.ModuleList(folded)
        # z_j = a_j X[idx_j] + c_j; u_j = (z_j - mu_j) / sigma_j; map = (0.5 / C * sum u^2 - med) / (q99 - med)
        median, q99 = (float(v) for v in model.scale_stats[s])
        inv_sigma = (-base.log_scale.detach()).exp()
        k = (0.5 / channels / (q99 - median)) ** 0.5
        alpha, beta = a * inv_sigma * k, (c - base.mean.detach()) * inv_sigma * k
        # back to stored order: stored channel idx_j carries logical j
        order = torch.argsort(idx)
        self.register_buffer("alpha", alpha[order].view(1, -1, 1, 1).clone())
        self.register_buffer("beta", beta[order].view(1, -1, 1, 1).clone())
        self.offset = median / (q99 - median)
        self.norm_shape = (channels, *hw)  # fixed: the graph is built for one input size
        # the state is kept as two blocks, [x1, y2] after each step, each step's halves drawn from them by
        # 1x1 convolutions: no Gather, Split or Concat nodes in the exported graph (FoldedStep.on_blocks)
        self.c1 = steps[0].c1
        for step in self.steps:
            step.make_selections(self.c1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(feat, self.norm_shape)
        p, q = x.split([self.c1, self.norm_shape[0] - self.c1], dim=1)
        for step in self.steps:
            p, q = step.on_blocks(p, q)
        c1 = self.c1
        return ((p * self.alpha[:, :c1] + self.beta[:, :c1]).pow(2).sum(dim=1, keepdim=True)
                + (q * self.alpha[:, c1:] + self.beta[:, c1:]).pow(2).sum(dim=1, keepdim=True) - self.offset)


class InferenceGraph(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> anomaly map (B, H, W) and image score (B,), as FastFlow.forward."""

    def __init__(self, model: FastFlow):
        super().__init__()
        cfg = model.config
        self.size, self.sigmas = cfg.input_size, model.scale_sigmas()  # sigmas: every scale's, by scale index
        self.backbone, self.pool = model.backbone, cfg.feature_pool
        self.map_scales, self.image_scales = model.map_scale_indices(), model.image_scale_indices()
        used = sorted(set(self.map_scales) | set(self.image_scales))  # a scale neither map reads is not computed
        strides = self.backbone.strides
        self.scales = nn.ModuleDict(
            {str(s): FoldedScale(model, s, (self.size[0] // strides[s], self.size[1] // strides[s])) for s in used})
        self.pooled = [model.pooled_scales()[s] for s in used]  # which used scales' features are averaged
        self.top_k = top_k_count(cfg.image_score_top, self.size[0] * self.size[1])

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The used scales' backbone features, neighbourhood-averaged where the model says: what the flows read."""
        return self.flow_inputs(self.backbone(images))

    def flow_inputs(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The backbone's four maps -> the used scales' ones, neighbourhood-averaged where the model says."""
        return pool_features([feats[int(key)] for key in self.scales], self.pool, self.pooled)

    def scale_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each used scale's NLL map (B, 1, h_s, w_s), in the order of self.scales."""
        return [scale(f) for scale, f in zip(self.scales.values(), self.features(images))]

    def per_scale(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return {int(key): F.interpolate(q, size=self.size, mode="bilinear", align_corners=False)
                for key, q in zip(self.scales, self.scale_maps(images))}

    def scoring_spec(self) -> ScoringSpec:
        """What the fusion after scale_maps needs (engine.native.NativeScoring, the CUDA path's scoring kernel)."""
        keys = [int(k) for k in self.scales]
        return ScoringSpec(size=self.size, sigma=tuple(self.sigmas[k] for k in keys), top_k=self.top_k,
                           shapes=tuple(scale.norm_shape[1:] for scale in self.scales.values()),
                           map_weights=tuple(1 / len(self.map_scales) if k in self.map_scales else 0.0 for k in keys),
                           image_weights=tuple(1 / len(self.image_scales) if k in self.image_scales else 0.0
                                               for k in keys))

    def fuse(self, maps: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Upsampled per-scale maps {scale: (B, 1, H, W)} -> the anomaly map and the map the image score reads."""
        same = self.image_scales == self.map_scales
        fused = fuse_maps({s: m[:, 0] for s, m in maps.items()}, self.sigmas,
                          [self.map_scales] if same else [self.map_scales, self.image_scales])
        return fused[0], fused[-1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap, score_map = self.fuse(self.per_scale(images))
        return amap, top_k_mean(score_map, self.top_k)


class ScaleMapsGraph(nn.Module):
    """InferenceGraph up to the per-scale NLL maps (B, h_s, w_s): for CPU backends whose upsample, blur and
    top-k run in the native post-processing (engine/native.py), which is faster there than in the graph."""

    def __init__(self, graph: InferenceGraph):
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(q[:, 0] for q in self.graph.scale_maps(images))


class BackboneGraph(nn.Module):
    """ScaleMapsGraph's first stage: images -> the used scales' averaged features (an engine may run the two
    stages at different precisions: the frozen backbone's features are the precision-sensitive part)."""

    def __init__(self, graph: InferenceGraph):
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.graph.features(images))


class FlowGraph(nn.Module):
    """ScaleMapsGraph's second stage: the features -> per-scale NLL maps (B, h_s, w_s)."""

    def __init__(self, graph: InferenceGraph):
        super().__init__()
        self.scales = graph.scales

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(scale(f)[:, 0] for scale, f in zip(self.scales.values(), feats))


class HeadGraph(nn.Module):
    """bf16-deep's first stage: images -> the backbone's stride-4 map. Its layers (the stem and the first
    stages) moved MTD scores most when run in bf16 (benchmarks/NOTES.md), so they stay in fp32."""

    def __init__(self, graph: InferenceGraph):
        super().__init__()
        self.backbone = graph.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.head(images)


class TailFlowGraph(nn.Module):
    """bf16-deep's second stage: the stride-4 map -> the backbone's deeper maps and the flows -> per-scale NLL
    maps (B, h_s, w_s)."""

    def __init__(self, graph: InferenceGraph):
        super().__init__()
        self.graph, self.flow = graph, FlowGraph(graph)

    def forward(self, first: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.flow(*self.graph.flow_inputs([first, *self.graph.backbone.tail(first)]))
