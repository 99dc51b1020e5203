"""The CUDA run path: backbone in cuDNN, flow and scoring through the fused Triton kernels, one CUDA graph per batch.

KernelGraph runs what the build wrote into the engine's kernels section (engine/builder/kernel_pack.py: per
coupling step the folded weights and the index tables that fold the channel gathers away, per scale alpha/beta
in physical channel order) and the header's scoring (engine/scoring.py ScoringSpec: fusion weights, top-k, each
scale's blur). Here it packs the GEMM weights in the run precision (which the build leaves to the load) and makes
each scale's resize-and-blur matrices (Rr, Rc: kernels/scoring.py) from the ScoringSpec through
engine.common.maths, as the native and device scoring do: one home for that maths, and nothing the header already
says is stored twice. The backbone and its pool come in as a module from the torch backend (FlowInputs).
It also runs on the CPU under TRITON_INTERPRET=1, which is how the tests check it against the graph.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.common.maths import resize_blur_matrix
from engine.format import EngineFileError
from engine.scoring import ScoringSpec
from kernels.coupling import conv_coupling, conv_relu, pack_conv_weight
from kernels.reference import top_k_mean
from kernels.scoring import score_maps

__all__ = ["KernelGraph", "FlowInputs", "CudaGraphRunner", "RUN_DTYPES", "read_kernel_section"]

KERNEL_SECTION_EXPANSION = 64  # the kernels' arrays may unpack to this many times their section's size, no more
RUN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_REBUILD = "rebuild the engine with python -m engine.build"


def read_kernel_section(data: bytes) -> dict[str, torch.Tensor]:
    """The kernels section (engine/builder/kernel_pack.py) -> its tensors by name; EngineFileError in one line when
    it is not a section of plain arrays (np.load with allow_pickle=False: an object array is refused, never run)."""
    try:
        unpacked = sum(member.file_size for member in zipfile.ZipFile(io.BytesIO(data)).infolist())
        if unpacked <= KERNEL_SECTION_EXPANSION * max(len(data), 1 << 20):  # else a zip bomb: refused, not inflated
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {name: torch.from_numpy(np.array(npz[name], order="C")) for name in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise EngineFileError(f"its kernels section is not readable ({type(e).__name__}); {_REBUILD}") from None
    raise EngineFileError(f"its kernels section declares {unpacked} bytes of arrays in {len(data)}; {_REBUILD}")


def _get(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """tensors[name], checked for its shape and dtype: the kernels index buffers by these sizes."""
    t = tensors.get(name)
    if t is None:
        raise EngineFileError(f"its kernels section lacks {name}; {_REBUILD}")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise EngineFileError(f"its kernels section's {name} is {t.dtype} {tuple(t.shape)}, not {dtype} {shape}; "
                              f"{_REBUILD}")
    return t


def _channels(t: torch.Tensor, name: str, channels: int) -> torch.Tensor:
    if len(t) and not (0 <= int(t.min()) and int(t.max()) < channels):
        raise EngineFileError(f"its kernels section's {name} indexes outside the scale's {channels} channels; "
                              f"{_REBUILD}")
    return t


class _PackedStep(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor], p: str, norm_shape: tuple[int, int, int],
                 dtype: torch.dtype):
        super().__init__()
        channels, h, w = norm_shape
        w1 = tensors.get(f"{p}.w1")
        if w1 is None or w1.dtype != torch.float32 or w1.dim() != 4 or w1.shape[2] != w1.shape[3] \
                or w1.shape[2] % 2 == 0:
            raise EngineFileError(f"its kernels section lacks {p}.w1 as float32 weights of an odd square kernel; "
                                  f"{_REBUILD}")
        self.hidden, c1, self.kernel = int(w1.shape[0]), int(w1.shape[1]), int(w1.shape[2])
        c2, k, f32 = channels - c1, self.kernel, torch.float32
        self.clamp = float(_get(tensors, f"{p}.clamp", (), torch.float64))
        self.clamp_factor = float(_get(tensors, f"{p}.clamp_factor", (), torch.float64))
        chan1 = _channels(_get(tensors, f"{p}.chan1", (c1,), torch.int32), f"{p}.chan1", channels)
        chan2 = _channels(_get(tensors, f"{p}.chan2", (c2,), torch.int32), f"{p}.chan2", channels)
        self.register_buffer("chan1", chan1.clone())
        self.register_buffer("chan2", chan2.clone())
        self.register_buffer("hidden_chan", torch.arange(self.hidden, dtype=torch.int32))
        self.register_buffer("w1", pack_conv_weight(w1, dtype))
        self.register_buffer("bias1", _get(tensors, f"{p}.bias1", (self.hidden, h, w), f32).contiguous())
        self.register_buffer("w2", pack_conv_weight(_get(tensors, f"{p}.w2", (2 * c2, self.hidden, k, k), f32), dtype))
        self.register_buffer("b2", _get(tensors, f"{p}.b2", (2 * c2,), f32).contiguous())
        for name in ("g2", "a2", "c2"):
            self.register_buffer(name, _get(tensors, f"{p}.{name}", (c2,), f32).contiguous())

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> None:
        conv_relu(x, self.chan1, self.w1, self.bias1, self.kernel, out=hidden)
        conv_coupling(hidden, self.w2, self.b2, self.g2, self.a2, self.c2, self.chan2, x, self.kernel, self.clamp,
                      self.clamp_factor, self.hidden_chan)


class _PackedScale(nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor], i: int, n_steps: int, shape: tuple[int, int],
                 size: tuple[int, int], sigma: float, dtype: torch.dtype):
        super().__init__()
        norm_shape = tuple(int(v) for v in _get(tensors, f"{i}.norm_shape", (3,), torch.int64))
        channels, h, w = norm_shape
        if (h, w) != tuple(shape) or channels < 2:
            raise EngineFileError(f"its kernels section's scale {i} is {channels} x {h} x {w}, where the header's "
                                  f"scoring has {shape[0]} x {shape[1]}; {_REBUILD}")
        self.norm_shape, self.dtype = norm_shape, dtype
        self.offset = float(_get(tensors, f"{i}.offset", (), torch.float64))
        self.steps = nn.ModuleList(_PackedStep(tensors, f"{i}.{j}", norm_shape, dtype) for j in range(n_steps))
        self.register_buffer("alpha_beta", _get(tensors, f"{i}.alpha_beta", (2 * channels,), torch.float32).clone())
        # R = blur @ upsample along each axis (engine/common/maths.py): (H, h) for the rows, (W, w) for the columns
        for name, n_in, n_out in (("resize_rows", h, size[0]), ("resize_cols", w, size[1])):
            self.register_buffer(name, torch.tensor(resize_blur_matrix(n_in, n_out, sigma), dtype=torch.float32))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(feat.float(), self.norm_shape).contiguous()
        hidden = None
        for step in self.steps:
            if hidden is None or hidden.shape[1] != step.hidden:
                hidden = torch.empty((x.shape[0], step.hidden, *x.shape[2:]), dtype=self.dtype, device=x.device)
            step(x, hidden)
        return x


class FlowInputs(nn.Module):
    """(B, 3, H, W) images -> the flow's inputs at every backbone scale, fp32: the backbone (channels-last, and
    autocast to the run precision unless fp32, on CUDA), then `pool` (the model's neighbourhood average, a function
    of the list of maps). The torch backend makes it from the model (engine/backends/pytorch.py flow_inputs)."""

    def __init__(self, backbone: nn.Module, pool: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                 precision: str = "fp32"):
        super().__init__()
        self.backbone, self.pool, self.precision = backbone, pool, precision

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        low = self.precision != "fp32" and images.is_cuda
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=RUN_DTYPES[self.precision], enabled=low):
            feats = self.backbone(images)
        return self.pool([f.float() for f in feats])


class KernelGraph(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (map (B, H, W), score (B,)), as the folded graph, via kernels/: the kernels
    section's tensors (read_kernel_section), the header's scoring, the feature module."""

    def __init__(self, tensors: dict[str, torch.Tensor], spec: ScoringSpec, features: FlowInputs,
                 precision: str = "fp32"):
        super().__init__()
        if precision not in RUN_DTYPES:
            raise ValueError(f"precision must be one of {sorted(RUN_DTYPES)}, not {precision!r}")
        self.precision, dtype = precision, RUN_DTYPES[precision]
        n = len(spec.shapes)
        self.keys = [int(k) for k in _get(tensors, "scales", (n,), torch.int64)]
        steps = [int(s) for s in _get(tensors, "steps", (n,), torch.int64)]
        self.flow_inputs, self.size = features, tuple(spec.size)
        self.scales = nn.ModuleList(_PackedScale(tensors, i, steps[i], spec.shapes[i], spec.size, spec.sigma[i], dtype)
                                    for i in range(n))
        self.map_weights, self.image_weights, self.top_k = spec.map_weights, spec.image_weights, spec.top_k

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The used scales' flow inputs, in the section's order."""
        feats = self.flow_inputs(images)
        return [feats[k] for k in self.keys]

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
