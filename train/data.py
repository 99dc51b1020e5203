"""Datasets: MVTec AD folder layout, or a plain folder of good images; images to model input.

Every image becomes (3, H, W) float32 in [0, 1] at the model's input (height, width); decoding is in
engine/common/images.py. to_model_input is the PyTorch reference of the engine's resize
(engine/preprocess.py, tested equal).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.common.geometry import as_hw
from engine.common.images import DataError, images_in, open_image

__all__ = ["Sample", "to_model_input", "read_mask", "train_images", "evaluation_samples", "image_sizes", "size_weights",
           "SIZE_GROUPS_MAX"]

SIZE_GROUPS_MAX = 8  # frames in at most this many sizes come from cameras or crops; more sizes: cut by hand (MTD)


def to_model_input(image: np.ndarray, hw: tuple[int, int] | int) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] -> (3, *hw): bilinear with antialiasing (downscales cleanly)."""
    hw = as_hw(hw)  # an int N: N x N
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp_(0.0, 1.0)


def read_mask(path: Path, image_hw: tuple[int, int], hw: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask -> bool (H, W) at its own resolution, or resized like its image to `hw`.

    Its size must equal the image's (`image_hw`, height and width).
    """
    im = open_image(path).convert("L")
    if (im.height, im.width) != tuple(image_hw):
        raise DataError(f"{path}: mask is {im.width}x{im.height} but its image is {image_hw[1]}x{image_hw[0]}")
    m = np.asarray(im) > 127
    if hw is None or m.shape == tuple(hw):
        return m
    t = torch.from_numpy(m).float()[None, None]
    return (F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)[0, 0] >= 0.5).numpy()


def train_images(root: str | Path) -> list[Path]:
    """Good training images: ROOT/train/good (MVTec layout) or the images directly in ROOT."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    folder = root / "train" / "good" if (root / "train").is_dir() else root
    if folder != root and not folder.is_dir():
        raise DataError(f"{root}: has train/ but no train/good folder (MVTec layout expected)")
    paths = images_in(folder)
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
        for path in images_in(folder):
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


def image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(height, width) of each image, from its header (nothing decoded)."""
    sizes = []
    for p in paths:
        with open_image(p, decode=False) as im:
            sizes.append((im.height, im.width))
    return sizes


def size_weights(sizes: list[tuple[int, int]]) -> np.ndarray | None:
    """Per training frame, how often an epoch draws it: count(its size)^-1/2, or None (each frame once).

    Frames of a few recurring sizes come from different cameras, crops or rig settings, and a size that few
    frames have is underfit when each frame is drawn once: on BSD the 16 training frames of 1540x645 (a second
    capture setting, 3 % of the frames) scored near the threshold although trained on (median 0.39 against 0.09
    for 1130x460), and so did the good test frames taken that way. The square root lifts a rare size without
    letting a handful of frames take half of every epoch (docs/lab/search-rounds.md, round 18). None where the
    frames come in one size, in sizes equally common, or in more than SIZE_GROUPS_MAX sizes (hand-cut tiles: MTD
    has 711 sizes in 762 images): such data trains as before, and train.fit reports no sizes for it.
    """
    counts = Counter(sizes)
    if not 2 <= len(counts) <= SIZE_GROUPS_MAX or len(set(counts.values())) == 1:
        return None
    return np.array([counts[s] ** -0.5 for s in sizes])
