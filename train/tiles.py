"""Frames to the model's input and its maps back to frames: whole, or in overlapping tiles (the reference).

A model with `tile_scale` 0 sees each frame resized whole to its input. With `tile_scale` s > 0 a frame
is resized by s (the scale the model trains and runs at, whatever the frame's size) and cut into
overlapping tiles of the input's size (engine.common.geometry.tile_grid); each tile is scored alone and
the tiles' maps are blended into one map at the resized frame's size; the image score is read off
that stitched map (the top fraction of its pixels). Training cuts its frames the same way, so the flow
learns the statistics it meets at run time. The engine does the same in numpy and C++ (engine/runtime.py),
tested equal to this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.common.geometry import blend_weights, stitch, tile_grid
from engine.common.maths import top_k_count
from train.data import to_model_input
from train.maps import top_k_mean
from train.model import FlowConfig

__all__ = ["FrameTiles", "frame_tiles", "stitch_frame", "flow_frames", "score_frames"]


@dataclass(frozen=True)
class FrameTiles:
    """Where one frame's tiles lie: the resized frame's (height, width) and each tile's (top, left)."""

    scaled_hw: tuple[int, int]
    starts: tuple[tuple[int, int], ...]


def frame_tiles(image: np.ndarray, config: FlowConfig) -> tuple[torch.Tensor, FrameTiles]:
    """(H, W, 3) float32 in [0, 1] -> (T, 3, *input_size) model inputs and where they lie."""
    hw = config.input_size
    if not config.tile_scale:
        return to_model_input(image, hw)[None], FrameTiles(hw, ((0, 0),))
    scaled, starts = tile_grid(image.shape[:2], config.tile_scale, hw, config.tile_overlap)
    x = to_model_input(image, scaled)
    tiles = torch.stack([x[:, y:y + hw[0], left:left + hw[1]] for y, left in starts])
    return tiles, FrameTiles(scaled, tuple(starts))


def stitch_frame(amaps: torch.Tensor, score_maps: torch.Tensor, where: FrameTiles,
                 config: FlowConfig) -> tuple[np.ndarray, float]:
    """One frame's tiles' (anomaly map, score map) (T, h, w) -> its stitched anomaly map and image score."""
    weights = blend_weights(config.input_size, config.tile_overlap)
    amap = stitch(amaps.cpu().numpy(), list(where.starts), where.scaled_hw, weights)
    same = score_maps is amaps
    smap = amap if same else stitch(score_maps.cpu().numpy(), list(where.starts), where.scaled_hw, weights)
    k = top_k_count(config.image_score_top, smap.size)
    return amap, float(top_k_mean(torch.from_numpy(smap)[None], k)[0])


@torch.no_grad()
def flow_frames(model, feats: list[torch.Tensor], frames: list[FrameTiles], device: torch.device,
                batch_size: int = 32):
    """Cached features of frames' tiles (in order) -> the flow's output in batches of whole frames: (those frames,
    zs, log-det), at most `batch_size` tiles a batch (a frame with more tiles alone). A generator; kept as a list,
    one flow pass serves more than one reading (train.fit calibrates the map's units and scores from one)."""
    first = 0
    i = 0
    while i < len(frames):
        j, n = i, 0
        while j < len(frames) and (j == i or n + len(frames[j].starts) <= batch_size):
            n += len(frames[j].starts)
            j += 1
        zs, logdet = model.flow([f[first:first + n].to(device) for f in feats])
        yield frames[i:j], zs, logdet
        first += n
        i = j


@torch.no_grad()
def score_frames(model, flowed, tops: tuple[float, ...] = ()):
    """The flow's output of frames' tiles (flow_frames) -> per frame: (stitched anomaly map, image score,
    {top fraction: image score} for `tops`, mean NLL per dimension of its tiles). A generator: one frame's
    maps in memory at a time (plus a batch of tiles)."""
    for batch_frames, zs, logdet in flowed:
        nll = model.nll_per_dim(zs, logdet).cpu()
        amaps, score_maps = model.score_maps(zs, model.config.input_size)
        t = 0
        for where in batch_frames:
            k = len(where.starts)
            a, s = amaps[t:t + k], score_maps[t:t + k]
            amap, score = stitch_frame(a, a if score_maps is amaps else s, where, model.config)
            by_top = {}
            if tops:
                smap = amap if score_maps is amaps else stitch_frame(s, s, where, model.config)[0]
                by_top = {top: float(model.image_score(torch.from_numpy(smap)[None], top)[0]) for top in tops}
            yield amap, score, by_top, float(nll[t:t + k].mean())
            t += k
