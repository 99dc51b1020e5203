"""Reading image files into (H, W, 3) float32 RGB in [0, 1]: numpy and Pillow only.

Training, evaluation, the build and the run side decode images here, so a file means the same pixels
everywhere (the engine must not import torch). Grayscale is repeated to 3 channels, alpha is
dropped; integer pixels are scaled by their bit depth, never by their content (16-bit: value / 65535, a dark
frame included). Anything unreadable is a DataError naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from engine.common.errors import UserError

__all__ = ["DataError", "IMAGE_SUFFIXES", "MAX_PIXELS", "open_image", "read_image", "images_in", "to_rgb_float"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
MAX_PIXELS = 100_000_000  # larger headers are refused before decoding (decompression bombs)


class DataError(UserError):
    """Bad input data a user can fix; the message names the file and the problem."""


def open_image(path: Path, decode: bool = True) -> Image.Image:
    """The image, decoded (or, with decode=False, only its header read: size and mode)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{path}: image is {im.width}x{im.height}, over the {MAX_PIXELS:,}-pixel limit")
            if decode:
                im.load()
        if im.width == 0 or im.height == 0:
            raise DataError(f"{path}: image has zero size")
        return im
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Any supported image file -> (H, W, 3) float32 RGB in [0, 1]."""
    path = Path(path)
    im = open_image(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        bits = _integer_bits(im)
        if bits > 16:
            raise DataError(f"{path}: {bits}-bit integer image: save it with 8 or 16 bits per sample")
        a = np.asarray(im).astype(np.float32) / (2.0 ** bits - 1)
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float32)
        if not np.isfinite(a).all():
            raise DataError(f"{path}: float image holds NaN or infinite values")
        a = np.clip(a, 0.0, 1.0)
    else:
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGBA").convert("RGB") if "transparency" in im.info or im.mode in ("P", "PA") \
                else im.convert("RGB")
        a = np.asarray(im).astype(np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def _integer_bits(im: Image.Image) -> int:
    """Bits per sample of an integer-mode image, from its file: Pillow reads 16-bit PNG and TIFF as I;16, and
    PGM/PPM with a maximum above 255 as "I" rescaled to 16 bits; a TIFF says its depth (32-bit ones are "I")."""
    if im.mode.startswith("I;16") or getattr(im, "tag_v2", None) is None:
        return 16
    return int(max(np.atleast_1d(im.tag_v2.get(258, 16))))  # TIFF BitsPerSample


def images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; hidden files skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def to_rgb_float(frame: np.ndarray, bgr: bool = False) -> np.ndarray:
    """A frame -> (H, W, 3) float32 RGB in [0, 1].

    uint8 / uint16 / float in [0, 1]; HxW gray, HxWx1, HxWx3 (RGB, or BGR with bgr=True), HxWx4 (alpha dropped).
    """
    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"frame of shape {a.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")
    a = a[:, :, :3]
    if bgr:
        a = a[:, :, ::-1]
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("frame holds NaN or infinite values")
        return np.clip(a, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"frame dtype {a.dtype}: expected uint8, uint16 or float in [0, 1]")
