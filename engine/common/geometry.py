"""Input geometry: the model's input shape, written WxH for people and (height, width) everywhere in code.

Frames are resized whole to the model's input (no crop, no padding), so the input's aspect ratio is the
one the training images have: a 1130x460 strip goes to 640x256, not to a 256x256 square that would
stretch its texture 2.5x one way against the other. `choose_input_size` picks that shape from the
training images alone (no labels). numpy and the standard library only: the run side imports this.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

__all__ = ["SIDE_MULTIPLE", "MIN_SIDE", "MAX_SIDE", "PIXEL_BUDGET", "AREA_FILL", "MIXED_ASPECTS", "MIXED_BUDGET",
            "parse_size", "format_size",
           "as_hw", "check_hw", "choose_input_size", "tile_starts", "tile_grid", "blend_weights", "stitch"]

SIDE_MULTIPLE = 32  # features are taken down to stride 32
MIN_SIDE = 64
MAX_SIDE = 4096  # an input side; frames larger than the input at its scale are cut in tiles
PIXEL_BUDGET = 3 * 256 * 256  # the default input's area at most: keeps a default BSD fit within budget on 2 cores
# (docs/lab/search-rounds.md, round 15)
AREA_FILL = 0.75  # the default input uses at least this share of its pixel limit
MIXED_ASPECTS = 2.0  # images whose aspect ratios spread wider (95th / 5th percentile) get a square input...
MIXED_BUDGET = 256 * 256  # ... of at most this many pixels (measured on MTD, docs/lab/search-rounds.md round 7)


def parse_size(text: str) -> tuple[int, int]:
    """'512x192' (width x height) or '256' (a square) -> (height, width). Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size: write WIDTHxHEIGHT (e.g. 512x192) or N for N x N")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    return check_hw((h, w))


def format_size(hw: tuple[int, int]) -> str:
    """(height, width) -> 'WxH'."""
    return f"{hw[1]}x{hw[0]}"


def as_hw(size) -> tuple[int, int]:
    """An int N (a square, as files of format versions before rectangles wrote it) or a (height, width) pair."""
    if isinstance(size, bool):
        raise ValueError(f"input size must be an integer or a [height, width] pair, not {size!r}")
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"input size must be an integer or a [height, width] pair, not {size!r}")


def check_hw(hw: tuple[int, int]) -> tuple[int, int]:
    """Each side a multiple of SIDE_MULTIPLE, from MIN_SIDE to MAX_SIDE; returns hw."""
    for side in hw:
        if side < MIN_SIDE or side > MAX_SIDE or side % SIDE_MULTIPLE:
            raise ValueError(f"input size {format_size(hw)}: each side must be a multiple of {SIDE_MULTIPLE}, from "
                             f"{MIN_SIDE} to {MAX_SIDE} (features are taken at stride {SIDE_MULTIPLE}; larger frames "
                             "are cut in tiles)")
    return hw


def choose_input_size(image_sizes: Iterable[tuple[int, int]], budget: int = PIXEL_BUDGET) -> tuple[int, int]:
    """The default input (height, width) for images of these (height, width) sizes, without labels.

    Keeps their median scale and their median aspect ratio: the pixel limit is `budget`, or their
    median area where that is smaller (small images are not enlarged); of the shapes on the
    SIDE_MULTIPLE grid that use AREA_FILL to all of that limit, the one nearest their aspect ratio
    (the larger on a tie). Images of widely mixed aspect ratios (portrait and landscape tiles: MTD)
    get the square of at most MIXED_BUDGET pixels instead: no one rectangle keeps their shapes.
    """
    sizes = list(image_sizes)
    if not sizes:
        raise ValueError("no images to choose an input size from")
    aspects = sorted(w / h for h, w in sizes)
    areas = sorted(h * w for h, w in sizes)
    aspect, area = aspects[len(aspects) // 2], areas[len(areas) // 2]
    if aspects[int(0.95 * (len(aspects) - 1))] / aspects[int(0.05 * (len(aspects) - 1))] > MIXED_ASPECTS:
        # no one rectangle keeps such images' shapes: a square treats both orientations alike
        side = max(MIN_SIDE, int(math.sqrt(min(MIXED_BUDGET, area))) // SIDE_MULTIPLE * SIDE_MULTIPLE)
        return (side, side)
    limit = max(min(budget, area), MIN_SIDE * MIN_SIDE)
    shapes = [(h, w) for h in range(MIN_SIDE, limit // MIN_SIDE + 1, SIDE_MULTIPLE)
              for w in range(MIN_SIDE, limit // h + 1, SIDE_MULTIPLE)]
    full = [s for s in shapes if s[0] * s[1] >= AREA_FILL * limit] or shapes
    return min(full, key=lambda s: (abs(math.log(s[1] / s[0] / aspect)), -s[0] * s[1]))


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Where tiles of `tile` pixels start along an axis of `length` (>= tile): evenly spread from 0 to
    length - tile, as few as keep neighbours overlapping by at least `overlap` of a tile."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_grid(frame_hw: tuple[int, int], scale: float, tile_hw: tuple[int, int],
              overlap: float) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """A frame resized by `scale` (each side at least the tile's: a narrower frame is stretched to it) and
    cut into overlapping tiles: (the resized frame's (height, width), the tiles' (top, left) corners)."""
    scaled = (max(tile_hw[0], round(frame_hw[0] * scale)), max(tile_hw[1], round(frame_hw[1] * scale)))
    return scaled, [(y, x) for y in tile_starts(scaled[0], tile_hw[0], overlap)
                    for x in tile_starts(scaled[1], tile_hw[1], overlap)]


def _ramp(n: int, overlap: float) -> np.ndarray:
    """One axis of a tile's blend weights: 1 inside, falling linearly to its edges over `overlap` of n."""
    d = np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5  # distance to the nearer edge
    return np.clip(d / max(1.0, overlap * n), 1e-3, 1.0).astype(np.float32)


def blend_weights(tile_hw: tuple[int, int], overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """A tile's map weights, separable: (along rows (h,), along columns (w,)) float32. 1 inside, falling
    linearly to its edges over the `overlap` share of its side (never to 0, so a frame's own border keeps
    its one tile's value). Stitched map = sum(weights * tile map) / sum(weights): seams fade, not jump."""
    return _ramp(tile_hw[0], overlap), _ramp(tile_hw[1], overlap)


def stitch(tile_maps: np.ndarray, starts: list[tuple[int, int]], scaled_hw: tuple[int, int],
           weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(T, h, w) maps of one frame's tiles -> its (height, width) map at the tiles' scale, blended by `weights`.

    The tiles lie on a grid (tile_grid: every row start with every column start), so the sum of the
    weights is itself separable: the division is two in-place passes, not a frame-sized weight map.
    """
    if len(starts) == 1 and tuple(tile_maps.shape[1:]) == tuple(scaled_hw):
        return np.asarray(tile_maps[0], dtype=np.float32)
    wy, wx = weights
    h, w = tile_maps.shape[1:]
    total = np.zeros(scaled_hw, dtype=np.float32)
    weighted = tile_maps * wy[None, :, None] * wx[None, None, :]
    for m, (y, x) in zip(weighted, starts):
        total[y:y + h, x:x + w] += m
    norm_y, norm_x = np.zeros(scaled_hw[0], np.float32), np.zeros(scaled_hw[1], np.float32)
    for y in sorted({y for y, _ in starts}):
        norm_y[y:y + h] += wy
    for x in sorted({x for _, x in starts}):
        norm_x[x:x + w] += wx
    total *= (1.0 / norm_y)[:, None]
    total *= (1.0 / norm_x)[None, :]
    return total
