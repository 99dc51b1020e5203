"""Image reading and datasets: MVTec AD folder layout, or a plain folder of good images.

Every image becomes (3, S, S) float32 in [0, 1]: grayscale is repeated to 3 channels, alpha is
dropped, 16-bit is scaled by 1/65535. Anything unreadable is a DataError naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from train.cli import UserError

__all__ = ["DataError", "IMAGE_SUFFIXES", "Sample", "read_image", "to_model_input", "load_batches",
           "read_mask", "train_images", "evaluation_samples"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
MAX_PIXELS = 100_000_000  # larger headers are refused before decoding (decompression bombs)


class DataError(UserError):
    """Bad input data a user can fix; the message names the file and the problem."""


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{path}: image is {im.width}x{im.height}, over the {MAX_PIXELS:,}-pixel limit")
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
    im = _open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float32)
        a = a / (65535.0 if a.max() > 255 or im.mode != "I" else 255.0)
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


def to_model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] -> (3, size, size): bilinear with antialiasing (downscales cleanly)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp_(0.0, 1.0)


def load_batches(paths: list[Path], size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield (B, 3, size, size) batches in order."""
    for i in range(0, len(paths), batch_size):
        yield torch.stack([to_model_input(read_image(p), size) for p in paths[i:i + batch_size]])


def read_mask(path: Path, image_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Ground-truth mask -> (size, size) bool, resized like its image; its size must equal the image's."""
    im = _open(path).convert("L")
    if (im.height, im.width) != image_hw:
        raise DataError(f"{path}: mask is {im.width}x{im.height} but its image is {image_hw[1]}x{image_hw[0]}")
    m = torch.from_numpy(np.asarray(im) > 127).float()[None, None]
    return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0] >= 0.5


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def train_images(root: str | Path) -> list[Path]:
    """Good training images: ROOT/train/good (MVTec layout) or the images directly in ROOT."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    folder = root / "train" / "good" if (root / "train").is_dir() else root
    if folder != root and not folder.is_dir():
        raise DataError(f"{root}: has train/ but no train/good folder (MVTec layout expected)")
    paths = _images_in(folder)
    if not paths:
        hint = "" if folder != root else " (expected MVTec layout ROOT/train/good or a folder of images)"
        raise DataError(f"{folder}: no images found{hint}")
    return paths


@dataclass(frozen=True)
class Sample:
    path: Path
    defect_type: str  # "good" or the name of the folder under test/
    mask_path: Path | None  # None for good images (all-normal mask)

    @property
    def label(self) -> int:
        return int(self.defect_type != "good")


def evaluation_samples(root: str | Path) -> list[Sample]:
    """MVTec test set: ROOT/test/<type>/*, masks at ROOT/ground_truth/<type>/<stem>_mask.png."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"{root}: no test/ folder (MVTec layout: test/good, test/<defect>, ground_truth/<defect>)")
    samples = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir()):
        for path in _images_in(folder):
            mask = None
            if folder.name != "good":
                mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"{path}: no ground-truth mask at {mask}")
            samples.append(Sample(path, folder.name, mask))
    kinds = {s.label for s in samples}
    if kinds != {0, 1}:
        raise DataError(f"{test}: needs both good and defective images to evaluate (found "
                        f"{'only good' if kinds == {0} else 'only defective' if kinds == {1} else 'no'} images)")
    return samples
