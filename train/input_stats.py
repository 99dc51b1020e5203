"""The training frames' statistics that drift alarms compare live frames with, recorded in model.pt by train.fit.

Each training frame is decoded as training decodes it and measured with the run side's own per-frame statistic
(engine.common.frame_stats: size, per-channel brightness and contrast), then summarised (InputStats: the sizes
with counts, quantiles of each number). The build carries the summary into the engine header; engine.drift
computes the same statistic on every live frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.common.frame_stats import InputStats, frame_stats
from engine.common.images import read_image

__all__ = ["input_stats"]


def input_stats(paths: list[Path]) -> InputStats:
    """The summary over the frames at `paths` (all of a model's good training frames, the held-out ones too)."""
    sizes, stats = [], np.empty((len(paths), 6))
    for i, path in enumerate(tqdm(paths, desc="input statistics", unit="img", leave=False)):
        frame = read_image(path)
        sizes.append(frame.shape[:2])
        stats[i] = frame_stats(frame)
    return InputStats.from_frames(sizes, stats)
