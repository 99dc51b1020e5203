"""FastFlow (Yu et al. 2021) with an AltUB base (Kim et al. 2022): the reference for what lineflow computes.

    image -> frozen backbone -> 4 feature maps (strides 4, 8, 16, 32)
          -> per scale: normalise -> N affine coupling steps -> z
          -> log-likelihood of z under N(mu_c, sigma_c^2) (learned per channel: AltUB)
          -> per-pixel NLL per scale, in units of held-out good pixels -> upsample, blur by half a
             cell, mean over the fine scales (strides 4, 8, 16) -> anomaly map; image score = mean of
             the top 10 % of the same kind of map made from the coarse scales (strides 16 and 32)

Training minimises the exact negative log-likelihood (with log|det J|); the anomaly map uses only
the base log-likelihood of z, as FastFlow does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.common.geometry import as_hw, check_hw
from engine.common.maths import top_k_count
from train.backbones import Backbone, create_backbone
from train.fused_tail import coupling_tail
from train.maps import fuse_maps, top_k_mean

__all__ = ["FlowConfig", "FastFlow", "CouplingStep", "PermuteChannels", "FeatureNorm", "GaussianBase", "soft_clamp",
           "SOFT_CLAMP_FACTOR", "pool_features", "FUSIONS", "MAP_SCALES", "IMAGE_SCALES", "POOL_SCALES", "BLUR_MODES"]


SOFT_CLAMP_FACTOR = 0.636  # ~2/pi, as FastFlow's reference code writes it; the kernels get it as a parameter


def soft_clamp(s: torch.Tensor, clamp: float, atan=torch.atan) -> torch.Tensor:
    """clamp * (2/pi) * atan(s / clamp): smooth, odd, bounded by +-clamp; keeps exp(s) finite.

    `atan`: the inference graph passes its polynomial (kernels.reference.poly_atan), which runtimes fuse.
    """
    return clamp * SOFT_CLAMP_FACTOR * atan(s / clamp)


class FeatureNorm(nn.Module):
    """Parameter-free LayerNorm over (C, H, W), then a learned per-channel affine counted in log|det J|.

    FastFlow learns the LayerNorm's affine; left outside the likelihood that scale lets the flow
    shrink z for free and the loss runs away (measured on the prototype). Counting it
    keeps the objective an exact likelihood.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.layer_norm(x, x.shape[1:])  # (B, C, H, W)
        y = x * self.log_scale.exp().view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])


class PermuteChannels(torch.autograd.Function):
    """x[:, perm] with the inverse gather as its backward. torch's own backward of an index is an accumulating
    index_put_, a visible share of a CPU training step (benchmarks/NOTES.md, "The flow's training step: the
    channel permutation's backward"); a permutation needs no sums."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_perm)
        return x[:, perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inv_perm,) = ctx.saved_tensors
        return grad[:, inv_perm], None, None


class CouplingStep(nn.Module):
    """One FastFlow step (FrEIA's AllInOneBlock shape): affine coupling, global affine, fixed permutation.

    x1 | x2 = split(x);  s, t = subnet(x1);  y2 = x2 * exp(soft_clamp(s)) + t
    y = permute(cat(x1, y2) * exp(g) + b)
    """

    def __init__(self, channels: int, kernel: int, hidden_ratio: float, clamp: float, seed: int):
        super().__init__()
        self.c1, self.c2, self.clamp = channels // 2, channels - channels // 2, clamp
        hidden = max(1, int(self.c1 * hidden_ratio))
        self.subnet = nn.Sequential(
            nn.Conv2d(self.c1, hidden, kernel, padding=kernel // 2), nn.ReLU(),
            nn.Conv2d(hidden, 2 * self.c2, kernel, padding=kernel // 2))
        nn.init.zeros_(self.subnet[2].weight)  # each step starts as the identity
        nn.init.zeros_(self.subnet[2].bias)
        self.global_log_scale = nn.Parameter(torch.zeros(channels))
        self.global_bias = nn.Parameter(torch.zeros(channels))
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _scale_shift(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.subnet(x1).split([self.c2, self.c2], dim=1)
        return soft_clamp(s, self.clamp), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x.split([self.c1, self.c2], dim=1)  # (B, c1, H, W), (B, c2, H, W)
        s, t = self._scale_shift(x1)
        y = torch.cat([x1, x2 * s.exp() + t], dim=1)
        g = self.global_log_scale.view(1, -1, 1, 1)
        y = PermuteChannels.apply(y * g.exp() + self.global_bias.view(1, -1, 1, 1), self.perm, self.inv_perm)
        # summed in fp32 at least where s comes from a bf16 convolution (train.fit's bf16 precision)
        logdet = s.sum(dim=(1, 2, 3), dtype=torch.promote_types(s.dtype, torch.float32)) + \
            self.global_log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet

    def forward_halves(self, x1: torch.Tensor,
                       x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward on the input's halves, all after the subnet one native pass each way (train/fused_tail.py, CPU,
        float32 x): the output's halves feed the next step, so a chain of steps never splits or concatenates."""
        y1, y2, s_sum = coupling_tail(x1, x2, self.subnet(x1), self.global_log_scale, self.global_bias, self.inv_perm,
                                      self.clamp, SOFT_CLAMP_FACTOR)
        return y1, y2, s_sum + self.global_log_scale.sum() * x1.shape[2] * x1.shape[3]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = y[:, self.inv_perm]
        y = (y - self.global_bias.view(1, -1, 1, 1)) * (-self.global_log_scale).exp().view(1, -1, 1, 1)
        y1, y2 = y.split([self.c1, self.c2], dim=1)
        s, t = self._scale_shift(y1)
        return torch.cat([y1, (y2 - t) * (-s).exp()], dim=1)


class GaussianBase(nn.Module):
    """N(mu_c, sigma_c^2) per channel. With AltUB both are learned (from N(0, I)); without, fixed."""

    def __init__(self, channels: int, learnable: bool):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(channels), requires_grad=learnable)
        self.log_scale = nn.Parameter(torch.zeros(channels), requires_grad=learnable)

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.view(1, -1, 1, 1)) * (-self.log_scale).exp().view(1, -1, 1, 1)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """-log N(z; mu, sigma^2) summed over all dimensions, per sample: (B,)."""
        u = self.standardise(z)
        per_dim = 0.5 * u.pow(2) + self.log_scale.view(1, -1, 1, 1) + 0.5 * math.log(2 * math.pi)
        return per_dim.sum(dim=(1, 2, 3))


def pool_features(feats: list[torch.Tensor], k: int, pooled: list[bool] | None = None) -> list[torch.Tensor]:
    """Each (B, C, h, w) map averaged over k x k neighbours (stride 1, borders over the pixels inside); k = 1: as is.
    `pooled`: which maps are averaged (default all).

    The average (PatchCore's local aggregation) gives each position its surroundings' context, so one
    odd feature vector in a normal neighbourhood counts less than a patch of them; at the fine scales it
    also spreads a small defect over nine cells (FlowConfig.pool_scales).
    """
    pooled = [True] * len(feats) if pooled is None else pooled
    return [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 and p else f
            for f, p in zip(feats, pooled, strict=True)]


# how scales are combined: each scale's NLL in units of held-out good pixels, averaged. The one fusion every engine
# builds; FastFlow's "probability" (1 - mean of exp(-nll)) was refused by every engine build, and is refused here
FUSIONS = ("normalised",)
IMAGE_SCALES = ("coarse", "coarsest", "all")
MAP_SCALES = ("fine", "all")
POOL_SCALES = ("coarse", "all")
BLUR_MODES = ("stride", "fixed")


_NUMBER = (int, float)
# (field, type, lowest, highest): what a FlowConfig may hold, checked before a model is built from it
_FIELD_LIMITS = (("backbone", str, None, None), ("fusion", str, None, None), ("map_scales", str, None, None),
                 ("image_scales", str, None, None), ("pool_scales", str, None, None), ("blur_mode", str, None, None),
                 ("altub", bool, None, None),
                 ("flow_steps", int, 1, 64), ("feature_pool", int, 1, 15), ("hidden_ratio", _NUMBER, 0.01, 16),
                 ("clamp", _NUMBER, 0.01, 100), ("blur_sigma", _NUMBER, 0, 64), ("tile_scale", _NUMBER, 0, 16),
                 ("tile_overlap", _NUMBER, 0, 0.75), ("image_score_top", _NUMBER, 0, 1))


@dataclass(frozen=True)
class FlowConfig:
    """Everything needed to rebuild the model; saved in model.pt."""

    backbone: str = "efficientnet_lite2"
    input_size: tuple[int, int] = (256, 256)  # (height, width) images (or tiles) are resized to; an int N: N x N
    # (model.pt holds the pair)
    tile_scale: float = 0.0  # 0: each frame resized whole to input_size; s > 0: frames resized by s, cut into tiles
    tile_overlap: float = 0.25  # tiles overlap by at least this share of their side
    flow_steps: int = 8
    hidden_ratio: float = 1.0
    clamp: float = 2.0
    altub: bool = True
    feature_pool: int = 3  # k x k neighbourhood average of backbone features before the flow; 1 = off
    pool_scales: str = "coarse"  # the scales averaged: "coarse" (strides 16 + 32; 4 and 8 as they are) or "all"
    blur_sigma: float = 2.0  # Gaussian smoothing of the stride-4 map, in input pixels; 0 = off
    blur_mode: str = "stride"  # "stride": each scale's sigma grows with its stride (half a cell); "fixed": blur_sigma
    fusion: str = "normalised"  # how scales are combined: "normalised" (FUSIONS: the one every engine builds)
    image_score_top: float = 0.1  # image score = mean of this fraction of the map's highest pixels; 0 = max
    map_scales: str = "fine"  # the scales the anomaly map fuses: "fine" (strides 4, 8, 16) or "all" four
    image_scales: str = "coarse"  # the map the image score reads: "coarse" (strides 16 + 32), "coarsest" (32), "all"

    def to_dict(self) -> dict:
        return {**asdict(self), "input_size": list(self.input_size)}

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        """model.pt's config in the current form (train.checkpoint.upgrade_checkpoint brings older files to it)."""
        known = {f.name for f in fields(cls)}
        unknown, missing = set(d) - known, known - set(d)
        if unknown or missing:  # a default filled in here could silently change what the weights mean
            raise ValueError(f"model config does not match this lineflow (unknown keys {sorted(unknown)}, "
                             f"missing keys {sorted(missing)})")
        if isinstance(d["input_size"], int) and not isinstance(d["input_size"], bool):  # not the current form
            raise ValueError(f"input_size must be a [height, width] pair, not {d['input_size']!r}")
        return cls(**d)

    def __post_init__(self):
        for name, kind, low, high in _FIELD_LIMITS:  # a model file is untrusted: types and ranges before any use
            v = getattr(self, name)
            ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool)
            if ok and kind is not bool and kind is not str:
                ok = math.isfinite(v) and low <= v <= high
            if not ok:
                raise ValueError(f"{name} must be {kind.__name__ if isinstance(kind, type) else 'a number'}"
                                 + (f" in [{low}, {high}]" if low is not None else "") + f", not {v!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS} (the fusion every engine builds), not {self.fusion!r}")
        object.__setattr__(self, "input_size", check_hw(as_hw(self.input_size)))
        if not (isinstance(self.tile_scale, (int, float)) and 0 <= self.tile_scale <= 16):
            raise ValueError("tile_scale must be 0 (frames resized whole) or a scale in (0, 16]")
        if not 0 <= self.tile_overlap <= 0.75:
            raise ValueError("tile_overlap must be in [0, 0.75]")
        if self.map_scales not in MAP_SCALES:
            raise ValueError(f"map_scales must be one of {MAP_SCALES}, not {self.map_scales!r}")
        if self.image_scales not in IMAGE_SCALES:
            raise ValueError(f"image_scales must be one of {IMAGE_SCALES}, not {self.image_scales!r}")
        if not 0 <= self.image_score_top < 1:
            raise ValueError("image_score_top must be in [0, 1)")
        if self.pool_scales not in POOL_SCALES:
            raise ValueError(f"pool_scales must be one of {POOL_SCALES}, not {self.pool_scales!r}")
        if self.blur_mode not in BLUR_MODES:
            raise ValueError(f"blur_mode must be one of {BLUR_MODES}, not {self.blur_mode!r}")
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise ValueError("feature_pool must be an odd number >= 1")


class FastFlow(nn.Module):
    def __init__(self, config: FlowConfig, backbone: Backbone | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else create_backbone(config.backbone, load_weights=False)
        chans = self.backbone.channels
        self.norms = nn.ModuleList(FeatureNorm(c) for c in chans)
        self.flows = nn.ModuleList(
            nn.ModuleList(CouplingStep(c, 3 if i % 2 == 0 else 1, config.hidden_ratio, config.clamp,
                                       seed=1000 * s + i) for i in range(config.flow_steps))
            for s, c in enumerate(chans))
        self.bases = nn.ModuleList(GaussianBase(c, config.altub) for c in chans)
        # per scale: median and 99th percentile of the pixel NLL on held-out good images (fit calibrates)
        self.register_buffer("scale_stats", torch.tensor([[0.0, 1.0]] * len(chans)))
        self.fused_tail = False  # flow() on CPUs through CouplingStep.forward_halves (train.fit's default step)

    def flow_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.norms, self.flows) for p in m.parameters()]

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.bases.parameters())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> frozen backbone maps at strides 4, 8, 16, 32, averaged where pooled_scales says."""
        return pool_features(self.backbone(images), self.config.feature_pool, self.pooled_scales())

    def flow(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features -> z per scale and the total log|det J| per sample, (B,)."""
        zs, logdet = [], 0.0
        for x, norm, steps in zip(feats, self.norms, self.flows):
            x, ld = norm(x)
            logdet = logdet + ld
            if self.fused_tail and x.device.type == "cpu" and x.dtype == torch.float32:
                x1, x2 = x.split([steps[0].c1, steps[0].c2], dim=1)
                for step in steps:
                    x1, x2, ld = step.forward_halves(x1, x2)
                    logdet = logdet + ld
                x = torch.cat([x1, x2], dim=1)
            else:
                for step in steps:
                    x, ld = step(x)
                    logdet = logdet + ld
            zs.append(x)
        return zs, logdet

    def flow_inverse(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """z per scale -> normalised features (the norm's input is not recoverable from LayerNorm)."""
        out = []
        for z, norm, steps in zip(zs, self.norms, self.flows):
            for step in reversed(steps):
                z = step.inverse(z)
            out.append((z - norm.bias.view(1, -1, 1, 1)) * (-norm.log_scale).exp().view(1, -1, 1, 1))
        return out

    def nll_per_dim(self, zs: list[torch.Tensor], logdet: torch.Tensor) -> torch.Tensor:
        """Exact negative log-likelihood per dimension, per sample: (B,). The training loss is its mean."""
        nll = sum(base.nll(z) for z, base in zip(zs, self.bases)) - logdet
        return nll / sum(z[0].numel() for z in zs)

    def pixel_nll(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale, 0.5 * mean_c ((z - mu_c) / sigma_c)^2: the base NLL per channel without its constant."""
        return [0.5 * base.standardise(z).pow(2).mean(dim=1) for z, base in zip(zs, self.bases)]  # [(B, h, w)]

    def anomaly_map(self, zs: list[torch.Tensor], size: tuple[int, int],
                    scales: list[int] | None = None) -> torch.Tensor:
        """z per scale -> (B, H, W) map, higher = more anomalous; each scale upsampled bilinearly and blurred
        (scale_sigmas), then averaged.

        Each scale's pixel NLL in units of held-out good pixels, (nll - median) / (q99 - median), averaged
        over scales: 0 is a typical good pixel, 1 the 99th percentile, whatever the scale's channel count.
        `scales`: which scales to fuse (default: `map_scales`).
        """
        scales = self.map_scale_indices() if scales is None else scales
        return self._fuse(self.pixel_nll(zs), [scales], size)[0]

    def _fuse(self, nlls: list[torch.Tensor], scale_sets: list[list[int]],
              size: tuple[int, int]) -> list[torch.Tensor]:
        """One (B, H, W) map per set of scales (fuse_maps); each scale normalised and upsampled once."""
        maps = {}
        for s in sorted({s for scales in scale_sets for s in scales}):
            nll, (median, q99) = nlls[s], self.scale_stats[s]
            per_scale = (nll - median) / (q99 - median)
            maps[s] = F.interpolate(per_scale[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return fuse_maps(maps, self.scale_sigmas(), scale_sets)

    def scale_sigmas(self) -> list[float]:
        """Each scale's map blur in input pixels: blur_sigma at stride 4, growing with the stride ("stride").

        Half a cell at every scale: a stride-16 map blurred by 2 px keeps its 16-px cells' blocky edges,
        and a stride-4 map blurred by 4 px spreads a pit of one or two cells. Against one sigma of 4 px for
        all scales, half a cell lifted AUPRO on MTD from 0.878 to 0.890 and on BSD from 0.812 to 0.827 at
        pixel AUROC +0.001 and level (docs/lab/search-rounds.md, round 11). "fixed": blur_sigma at every scale.
        """
        strides, sigma = self.backbone.strides, self.config.blur_sigma
        if self.config.blur_mode == "fixed":
            return [float(sigma)] * len(strides)
        return [float(sigma * st / strides[0]) for st in strides]

    def pooled_scales(self) -> list[bool]:
        """Which scales' features are neighbourhood-averaged: "coarse" = strides 16 and 32, "all".

        The average sharpens the coarse scales' statistics, whose cells see wide context, and blurs a pit of
        a few cells at strides 4 and 8 into its neighbours: with strides 4 and 8 as they are, BSD's AUPRO
        rose from 0.767 to 0.812 and MTD's from 0.816 to 0.878, pixel AUROC level on MTD; averaging no scale
        cost MTD 0.046 pixel AUROC (docs/lab/search-rounds.md, round 10). The image score reads the coarse scales, so it
        is the same either way.
        """
        n = len(self.backbone.channels)
        return [self.config.pool_scales == "all" or s >= n - 2 for s in range(n)]

    def map_scale_indices(self) -> list[int]:
        """The scales the anomaly map fuses: "fine" = strides 4, 8, 16; "all" adds stride 32.

        A stride-32 cell is 32 px wide (a quarter of a 128 px image): it blurs small defects. Without
        it pixel AUROC / AUPRO on the demo set rise from 0.82 / 0.53 to 0.89 / 0.70; on MTD pixel AUROC
        moves from 0.965 to 0.963 (docs/lab/search-rounds.md, round 2).
        """
        n = len(self.flows)
        return list(range(n - 1)) if self.config.map_scales == "fine" else list(range(n))

    def image_scale_indices(self) -> list[int]:
        """The scales the image score reads: "coarse" = strides 16 and 32, "coarsest" = 32, "all".

        Coarse features see a wide context, and a defect changes a part's look there; the fine scales
        also light up on harmless texture. On MTD the coarse pair ranks images at 0.97 against 0.92
        for all four scales; on the synthetic demo set all four win (0.86 against 0.79), and the
        coarse pair beats stride 32 alone on both (docs/lab/search-rounds.md, round 2).
        """
        n = len(self.flows)
        return {"coarse": [n - 2, n - 1], "coarsest": [n - 1], "all": list(range(n))}[self.config.image_scales]

    def image_score(self, score_map: torch.Tensor, top: float | None = None) -> torch.Tensor:
        """(B, H, W) -> (B,): the mean of the top `top` fraction of pixels (the max when 0).

        `top` defaults to the config's `image_score_top`; train.evaluate passes others to compare rules.
        """
        top = self.config.image_score_top if top is None else top
        return top_k_mean(score_map, top_k_count(top, score_map[0].numel()))

    def score_maps(self, zs: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """z per scale -> the anomaly map (B, H, W) from `map_scales` and the map the image score reads."""
        nlls = self.pixel_nll(zs)  # once for both maps
        map_scales, image_scales = self.map_scale_indices(), self.image_scale_indices()
        if image_scales == map_scales:
            amap = self._fuse(nlls, [map_scales], size)[0]
            return amap, amap
        amap, score_map = self._fuse(nlls, [map_scales, image_scales], size)
        return amap, score_map

    def score(self, zs: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """z per scale -> anomaly maps (B, H, W) from `map_scales`, image scores (B,) from `image_scales`."""
        amap, score_map = self.score_maps(zs, size)
        return amap, self.image_score(score_map)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> anomaly maps (B, H, W) and image scores (B,)."""
        zs, _ = self.flow(self.features(images))
        return self.score(zs, images.shape[-2:])
