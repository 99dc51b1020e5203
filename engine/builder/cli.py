"""The build command, `python -m engine.build model.pt` (entry point engine/build.py): compile a trained model
into one engine file for fast scoring.

Slow, once, may import everything: folds the model into its inference graph, checks the graph
against the PyTorch reference, exports ONNX (opset 17), compiles it for a backend, checks the
compiled engine against the reference again, and writes the engine file.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import replace
from pathlib import Path

from engine.builder.builder import BUILD_BACKENDS, BUILD_PRECISIONS, BuildConfig, build_engine
from engine.common.cli import HelpFormatter
from engine.common.errors import UserError
from engine.common.files import check_output
from engine.common.geometry import format_size
from engine.common.images import DataError
from engine.header import MAX_BATCH, MAX_BATCH_PIXELS
from train.checkpoint import ModelMeta, load_model_bytes
from train.data import train_images

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d = BuildConfig()
    p = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("model", help="model.pt written by python -m train.fit")
    p.add_argument("-o", "--out", help="engine file to write (default: the model's name with .engine)")
    p.add_argument("--backend", default=d.backend, choices=BUILD_BACKENDS,
                   help="auto: TensorRT on an NVIDIA GPU (the CUDA path, torch, if the plan fails), else the "
                        "fastest installed CPU backend, timed here")
    p.add_argument("--precision", default=d.precision, choices=BUILD_PRECISIONS,
                   help="bf16-flow: OpenVINO runs the backbone in fp32 and the flow in bf16; bf16-deep: the "
                        "backbone to its stride-4 map in fp32, its deeper layers and the flow in bf16; int8: NNCF "
                        "quantizes the backbone and flow convolutions (the stem stays fp32), int8-backbone the "
                        "backbone only, "
                        "with ranges from the check images. Only precisions the hardware runs natively are built. "
                        "auto: of the precisions that stay within tolerance of fp32 on the check images, the fastest, "
                        "timed here: OpenVINO tries int8-backbone, bf16 and bf16-deep (on real check images only), "
                        "bf16-flow (on CPUs with bf16) and fp32; the GPU paths bf16 and fp32; fp16 only when asked for")
    p.add_argument("--batch", type=int, default=d.batch or 0, help="fixed batch size; 0 = any batch size")
    p.add_argument("--calib", metavar="DIR", default=d.calib, help="folder of good images for the accuracy checks "
                   "and int8's ranges (default: the model's training images, if still where train.fit read them; "
                   "else random images, which check the arithmetic but not real-image precision, and no int8)")
    return p


def _training_images(meta: ModelMeta) -> str | None:
    """The folder of good images the model was trained on, where train.fit recorded it, if it still holds images."""
    if meta.data is None:
        return None
    try:
        return str(train_images(meta.data.root)[0].parent)
    except (DataError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model_path = Path(args.model)
    out = check_output("-o", args.out or model_path.with_suffix(".engine"))
    if not 0 <= args.batch <= MAX_BATCH:  # the engine header's bound, checked before the build's slow work
        raise UserError(f"--batch must be 0 (any) or a batch size from 1 to {MAX_BATCH}")
    config = BuildConfig(backend=args.backend, precision=args.precision, batch=args.batch or None, calib=args.calib)
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such file")
    model_bytes = model_path.read_bytes()  # read once: the engine carries exactly what was checked
    model, meta = load_model_bytes(io.BytesIO(model_bytes), str(model_path))
    h, w = model.config.input_size
    if args.batch * h * w > MAX_BATCH_PIXELS:
        raise UserError(f"--batch {args.batch}: at most {MAX_BATCH_PIXELS // (h * w)} frames of {h}x{w} px a batch")
    if config.calib is None:
        config = replace(config, calib=_training_images(meta))
        if config.calib:
            print(f"check images: the model's training images in {config.calib} (--calib DIR to choose others)")
    t0 = time.perf_counter()
    header = build_engine(model, meta, model_bytes, out, config)
    print(f"wrote {out}: {header.backend} {header.precision}, {format_size(header.input_size)} px, "
          f"batch {header.batch or 'any'}, threshold {header.threshold:.4f}, "
          f"{header.checks['ms_per_frame']:.1f} ms/frame here at batch {header.checks['ms_per_frame_batch']} "
          f"({time.perf_counter() - t0:.0f} s to build)")
    return 0

