"""What a frame looks like, in a few numbers: the statistic that drift alarms compare with the training frames'.

Per frame: its size (height, width) and, per RGB channel, its brightness (mean) and contrast (standard deviation)
on a grid of at most SAMPLE_SIDE x SAMPLE_SIDE pixels (a regular subsample: cheap on a live frame, and the same
pixels of a frame however it arrives, decoded from a file or straight from a camera). train.fit summarises the
statistic over its training frames (InputStats, quantiles per number; train/input_stats.py) into model.pt, the
build carries the summary into the engine header, and engine.drift computes the same statistic on every live
frame with the function below: one formula for both sides.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from engine.common.images import to_rgb_float
from engine.common.schema import integer, number, strict_kwargs

__all__ = ["SAMPLE_SIDE", "STATS_METHOD", "QUANTILES", "SIZES_KEPT", "CHANNELS", "frame_stats", "InputStats"]

# a grid of at most 64 x 64 pixels: training and the run side measure the same grid of a frame, so the numbers
# compare exactly; against the whole frame's, a BSD frame's are within 1 % (small MTD tiles' contrast within 16 %).
# Its cost on a live frame: docs/line-loop.md, "Drift alarms"
SAMPLE_SIDE = 64
STATS_METHOD = f"grid{SAMPLE_SIDE}-rgb-mean-std"  # recorded with the summary: another formula is not comparable
QUANTILES = (0.0, 0.005, 0.01, 0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975, 0.99, 0.995, 1.0)  # the summary's levels
SIZES_KEPT = 32  # the most common frame sizes kept with their counts (hand-cut tiles come in hundreds of sizes)
CHANNELS = ("r", "g", "b")


def frame_stats(frame: np.ndarray, bgr: bool = False) -> np.ndarray:
    """A frame (as engine.Engine takes it: HxW or HxWxC, uint8 / uint16 / float in [0, 1], RGB or BGR) -> (6,)
    float64: brightness r, g, b, then contrast r, g, b, on the frame's SAMPLE_SIDE grid."""
    a = np.asarray(frame)
    h, w = a.shape[:2]
    sy, sx = -(-h // SAMPLE_SIDE), -(-w // SAMPLE_SIDE)  # ceil: at most SAMPLE_SIDE samples a side
    grid = to_rgb_float(a[sy // 2::sy, sx // 2::sx], bgr).reshape(-1, 3).astype(np.float64)  # (n, 3)
    return np.concatenate([grid.mean(axis=0), grid.std(axis=0)])


def _levels(name: str, v, n: int) -> list[float]:
    """n finite numbers, not decreasing (quantiles at QUANTILES' levels)."""
    if not isinstance(v, list) or len(v) != n:
        raise ValueError(f"input_stats.{name} must be a list of {n} numbers")
    out = [number(f"input_stats.{name}", x) for x in v]
    if any(b < a for a, b in zip(out, out[1:])):
        raise ValueError(f"input_stats.{name} must not decrease (quantiles)")
    return out


@dataclass(frozen=True)
class InputStats:
    """The training frames' statistic, summarised: their sizes with counts, and quantiles (at `quantiles`' levels)
    of each channel's brightness and contrast and of the frames' area (pixels) and aspect (width / height).
    Carried in model.pt (ModelMeta.input_stats) and the engine header (`input_stats`, its to_dict)."""

    n_frames: int
    sizes: list  # [[height, width, frames], ...], most common first, at most SIZES_KEPT
    quantiles: list  # the levels, QUANTILES when written
    brightness: list  # per channel (r, g, b): the training frames' means at each level
    contrast: list  # per channel: their standard deviations at each level
    area: list  # height x width at each level
    aspect: list  # width / height at each level
    method: str = STATS_METHOD

    def __post_init__(self):
        integer("input_stats.n_frames", self.n_frames)
        if not isinstance(self.method, str):
            raise ValueError("input_stats.method must be a string")
        levels = self.quantiles
        if not isinstance(levels, list) or not 2 <= len(levels) <= 64:
            raise ValueError("input_stats.quantiles must be a list of 2-64 levels")
        levels = _levels("quantiles", levels, len(levels))
        if levels[0] < 0 or levels[-1] > 1:
            raise ValueError("input_stats.quantiles must lie in [0, 1]")
        for name in ("brightness", "contrast"):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) != len(CHANNELS):
                raise ValueError(f"input_stats.{name} must hold {len(CHANNELS)} channels")
            for c, row in zip(CHANNELS, v):
                _levels(f"{name}.{c}", row, len(levels))
        _levels("area", self.area, len(levels))
        _levels("aspect", self.aspect, len(levels))
        if not isinstance(self.sizes, list) or not 1 <= len(self.sizes) <= SIZES_KEPT:
            raise ValueError(f"input_stats.sizes must be a list of 1-{SIZES_KEPT} [height, width, frames]")
        for row in self.sizes:
            if not isinstance(row, list) or len(row) != 3:
                raise ValueError("input_stats.sizes holds [height, width, frames] triples")
            for x in row:
                integer("input_stats.sizes", x)
        if sum(row[2] for row in self.sizes) > self.n_frames:
            raise ValueError("input_stats.sizes count more frames than n_frames")

    @classmethod
    def from_frames(cls, sizes: list[tuple[int, int]], stats: np.ndarray) -> InputStats:
        """Per training frame its (height, width) and frame_stats (N, 6) -> the summary."""
        stats = np.asarray(stats, dtype=np.float64)
        assert stats.ndim == 2 and stats.shape == (len(sizes), 2 * len(CHANNELS)) and len(sizes) > 0
        hw = np.asarray(sizes, dtype=np.float64)  # (N, 2)
        levels = list(QUANTILES)

        def q(x: np.ndarray) -> list[float]:
            return [float(v) for v in np.quantile(x, levels)]

        counts = Counter(tuple(map(int, s)) for s in sizes).most_common(SIZES_KEPT)
        return cls(n_frames=len(sizes), sizes=[[h, w, n] for (h, w), n in counts], quantiles=levels,
                   brightness=[q(stats[:, c]) for c in range(3)], contrast=[q(stats[:, 3 + c]) for c in range(3)],
                   area=q(hw[:, 0] * hw[:, 1]), aspect=q(hw[:, 1] / hw[:, 0]))

    @classmethod
    def from_dict(cls, d: dict) -> InputStats:
        """The JSON object (model.pt's metadata, the engine header) -> InputStats; ValueError naming the field."""
        try:
            return cls(**strict_kwargs(cls, d, "input_stats"))
        except TypeError as e:
            raise ValueError(f"input_stats: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    def at(self, name: str, level: float) -> float | list[float]:
        """The summary's value of `name` (brightness, contrast: one per channel; area, aspect) at a recorded level."""
        i = self.quantiles.index(level)
        v = getattr(self, name)
        return [row[i] for row in v] if name in ("brightness", "contrast") else v[i]
