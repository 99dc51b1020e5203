"""The native Bayer demosaic (cpp/lineflow/debayer.cpp) against OpenCV's bilinear one on a 5 MP frame, medians.

    python research/debayer_speed.py

GenICam's BayerRG is OpenCV's BayerBG (OpenCV names the pattern from the second row's second pixel); both are
bilinear. A plain copy of the input is printed beside them as the memory floor's scale."""

import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import _native  # noqa: E402


def median_ms(f, n: int = 15) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1000


raw = np.random.default_rng(0).integers(0, 256, (2048, 2448), dtype=np.uint8)  # 5 MP, as a 2448x2048 camera
for _ in range(2):
    native = median_ms(lambda: _native.debayer(raw, 0, 0))
    opencv = median_ms(lambda: cv2.cvtColor(raw, cv2.COLOR_BayerBG2RGB))
    copy = median_ms(lambda: raw.copy())
    print(f"5 MP BayerRG8 -> RGB8: native {native:.2f} ms, OpenCV {opencv:.2f} ms, a copy of the input {copy:.2f} ms")
