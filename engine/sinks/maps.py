"""Heat-map overlay PNGs, one per scored frame, each written whole."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from engine.common.files import atomic_write
from engine.results import Result
from engine.sinks.base import SinkSummary
from engine.sinks.overlay import overlay

__all__ = ["MapSink"]


class MapSink:
    """Heat-map overlays as PNG files, one per scored frame: DIR/<index>_<name>.png."""

    def __init__(self, folder: str | Path, threshold: float):
        self.folder, self.threshold = Path(folder), threshold
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, result: Result) -> None:
        if result.error is not None:
            return
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(result.source).stem)[:80] or "frame"
        png = io.BytesIO()
        Image.fromarray(overlay(result, self.threshold)).save(png, format="PNG")
        path = self.folder / f"{result.index:06d}_{stem}.png"
        with atomic_write(path, fsync=False) as f:  # a whole PNG or none; OutputError naming it when the disk is full
            f.write(png.getbuffer())

    def close(self, completed: bool = True) -> SinkSummary:
        return SinkSummary()
