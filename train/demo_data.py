"""python -m train.demo_data OUT: a small MVTec-layout dataset made from real texture photographs.

The photographs (brick, grass, gravel) ship with scikit-image, so nothing is downloaded. Good
images are random crops; defects are drawn onto other crops: scratches (thin bright or dark
curves), spots (soft-edged blobs) and patches (a square cut from elsewhere in the texture, turned
and pasted), each with its pixel mask. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from engine.common.cli import HelpFormatter
from engine.common.errors import UserError, run_cli

__all__ = ["TEXTURES", "DEFECTS", "make_demo_dataset", "main"]

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "spot", "patch")


def _texture(name: str) -> np.ndarray:
    import skimage.data
    return getattr(skimage.data, name)().astype(np.float32)  # (512, 512) gray, 0..255


def _crop(tex: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = rng.integers(0, tex.shape[0] - size + 1), rng.integers(0, tex.shape[1] - size + 1)
    img = tex[y:y + size, x:x + size]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gain, offset = rng.uniform(0.95, 1.05), rng.uniform(-5, 5)  # lighting varies a little
    return np.clip(img * gain + offset, 0, 255)


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    p0 = rng.uniform(0.15, 0.85, 2) * size
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.6) * size
    bend = rng.uniform(-0.15, 0.15) * size
    t = np.linspace(-0.5, 0.5, 200)[:, None]
    d = np.array([np.cos(angle), np.sin(angle)])
    pts = p0 + t * length * d + (1 - 4 * t**2) * bend * np.array([-d[1], d[0]])  # a gentle arc
    dist = np.min((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2, axis=-1) ** 0.5
    width = rng.uniform(1.0, 2.5)
    alpha = np.clip(1.5 - dist / width, 0, 1)
    value = 235.0 if rng.random() < 0.5 else 20.0
    return img * (1 - alpha) + value * alpha, alpha > 0.25


def _spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.04, 0.1, 2) * size
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    alpha = np.clip(1.5 - r, 0, 1) * 0.8
    value = img.mean() + (70.0 if rng.random() < 0.5 else -70.0)
    return img * (1 - alpha) + value * alpha, alpha > 0.2


def _patch(img: np.ndarray, rng: np.random.Generator, tex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    p = int(rng.uniform(0.18, 0.3) * size)
    src = _crop(tex, p, rng)
    src = np.rot90(src, k=int(rng.integers(1, 4)))
    src = np.clip((src - src.mean()) * rng.uniform(1.3, 1.6) + src.mean() + rng.uniform(-25, 25), 0, 255)
    y, x = rng.integers(0, size - p + 1, 2)
    out, mask = img.copy(), np.zeros(img.shape, bool)
    out[y:y + p, x:x + p] = src
    mask[y:y + p, x:x + p] = True
    return out, mask


def make_demo_dataset(out: str | Path, seed: int = 0, size: int = 128, n_train: int = 60, n_test_good: int = 10,
                      n_test_defect: int = 6, overwrite: bool = False) -> Path:
    """Write the dataset (counts are per texture; defect counts per texture and type) atomically.

    `overwrite` replaces an existing demo set (a folder with train/good and test/), nothing else.
    """
    out = Path(out)
    is_demo = (out / "train" / "good").is_dir() and (out / "test").is_dir()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite and is_demo):
        raise UserError(f"{out}: already exists and is not an empty folder"
                        + (" (--overwrite replaces a previous demo set)" if is_demo else ""))
    if size < 32 or size > 512:
        raise UserError("--size must be between 32 and 512 (the source photographs are 512x512)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rng = np.random.default_rng(seed)
        for tex_name in TEXTURES:
            tex = _texture(tex_name)

            def save(img: np.ndarray, folder: str, name: str) -> None:
                (tmp / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(img).astype(np.uint8)).save(tmp / folder / f"{name}.png")

            for i in range(n_train):
                save(_crop(tex, size, rng), "train/good", f"{tex_name}_{i:03d}")
            for i in range(n_test_good):
                save(_crop(tex, size, rng), "test/good", f"{tex_name}_{i:03d}")
            for defect in DEFECTS:
                for i in range(n_test_defect):
                    base = _crop(tex, size, rng)
                    img, mask = _patch(base, rng, tex) if defect == "patch" else \
                        (_scratch if defect == "scratch" else _spot)(base, rng)
                    save(img, f"test/{defect}", f"{tex_name}_{i:03d}")
                    save(mask * 255.0, f"ground_truth/{defect}", f"{tex_name}_{i:03d}_mask")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo_data", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("out", help="folder to create (must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--train", type=int, default=60, help="good training images per texture")
    p.add_argument("--test-good", type=int, default=10, help="good test images per texture")
    p.add_argument("--test-defect", type=int, default=6, help="defective test images per texture and type")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo set at OUT")
    args = p.parse_args(argv)
    if min(args.train, args.test_good, args.test_defect) < 1:
        raise UserError("--train, --test-good and --test-defect must be at least 1")
    out = make_demo_dataset(args.out, args.seed, args.size, args.train, args.test_good, args.test_defect,
                            args.overwrite)
    n = sum(1 for _ in out.rglob("*.png"))
    print(f"wrote {out}: {n} PNG files ({', '.join(TEXTURES)}; defects: {', '.join(DEFECTS)})")
    return 0


if __name__ == "__main__":
    run_cli(main)
