"""python -m engine.build model.pt: compile a trained model into one engine file for fast scoring.

Slow, once, may import everything: folds the model into its inference graph (engine/graph.py), checks
the graph against the PyTorch reference, exports ONNX (opset 17), compiles it for a backend, checks
the compiled engine against the reference again, and writes the engine file (engine/format.py).
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from engine.backends import BACKENDS, STAGE_PRECISIONS, available_backends, load_backend
from engine.format import write_engine
from engine.graph import BackboneGraph, FlowGraph, InferenceGraph, ScaleMapsGraph
from engine.preprocess import frames_to_input
from train.checkpoint import load_model_bytes
from train.cli import UserError, run_cli
from train.images import images_in, read_image
from train.model import FastFlow

__all__ = ["build_engine", "export_onnx", "main"]

GRAPH_TOLERANCE = 1e-4  # max |map difference|, folded graph or fp32 engine vs the reference (relative above 1)
LOW_PRECISION_TOLERANCE = {"score": 0.02, "map": 0.1}  # bf16/fp16 vs fp32, in map units (1 = q99 of good pixels)


def export_onnx(graph: InferenceGraph, batch: int | None, part: str = "full") -> bytes:
    """The inference graph, or a part of it, as ONNX (opset 17); batch None = dynamic batch dimension.

    full: images -> anomaly_map (B, S, S) and score (B,) (TensorRT). maps: images -> the per-scale NLL maps
    q0..qn (B, h, h), fused by the native post-processing (CPU backends). backbone + flow: maps in two
    graphs, images -> features f0..fn -> q0..qn, for engines that run the two at different precisions.
    """
    n = len(graph.scales)
    x = torch.rand(batch or 2, 3, graph.size, graph.size)
    feats, maps = [f"f{i}" for i in range(n)], [f"q{i}" for i in range(n)]
    if part == "flow":
        with torch.no_grad():
            module, args, inputs, outputs = FlowGraph(graph), tuple(graph.features(x)), feats, maps
    else:
        module, outputs = {"full": (graph, ["anomaly_map", "score"]), "maps": (ScaleMapsGraph(graph), maps),
                           "backbone": (BackboneGraph(graph), feats)}[part]
        args, inputs = (x,), ["images"]
    dynamic = None if batch else {name: {0: "batch"} for name in [*inputs, *outputs]}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: sizes are fixed on purpose
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)
    return buf.getvalue()


def _calibration_images(calib: str | None, size: int, limit: int = 32) -> tuple[np.ndarray, str]:
    """Real images for the build's checks: --calib DIR, else random images (said so in the header)."""
    if calib is None:
        rng = np.random.default_rng(0)
        return rng.random((4, 3, size, size), dtype=np.float32), "4 random images (no --calib given)"
    folder = Path(calib)
    if not folder.is_dir():
        raise UserError(f"{folder}: --calib needs a folder of good images")
    paths = images_in(folder)
    if not paths:
        raise UserError(f"{folder}: no images found for --calib")
    paths = paths[:: max(1, len(paths) // limit)][:limit]
    return frames_to_input([read_image(p) for p in paths], size), f"{len(paths)} images from {folder}"


def _compare(run, ref_maps: np.ndarray, ref_scores: np.ndarray, images: np.ndarray, batch: int | None) -> dict:
    step = batch or 8
    maps, scores = [], []
    for i in range(0, len(images), step):
        chunk = images[i:i + step]
        n = len(chunk)
        if batch and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        m, s = run(np.ascontiguousarray(chunk))
        maps.append(m[:n])
        scores.append(s[:n])
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    # in map units, relative where the map exceeds 1: float32 keeps ~7 digits, and a random image
    # scores in the hundreds (good images stay near 0..1, where this is the absolute difference)
    map_scale = np.maximum(1.0, np.abs(ref_maps).reshape(len(ref_maps), -1).max(axis=1))
    map_diff = np.abs(maps - ref_maps).reshape(len(maps), -1).max(axis=1) / map_scale
    score_diff = np.abs(scores - ref_scores) / np.maximum(1.0, np.abs(ref_scores))
    return {"max_map_diff": float(map_diff.max()), "max_score_diff": float(score_diff.max())}


def _median_ms(run, image: np.ndarray, repeats: int = 5) -> float:
    run(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(image)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _tensorrt_plan(onnx: bytes, precision: str, batch: int | None, size: int, max_batch: int = 32) -> bytes:
    """ONNX -> serialised TensorRT plan (TensorRT 10/11 Python API). Not run on our machines."""
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    lo, hi = (batch, batch) if batch else (1, max_batch)
    profile.set_shape("images", (lo, 3, size, size), (hi if batch else 8, 3, size, size), (hi, 3, size, size))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT failed to build the engine (see its log above)")
    return bytes(plan)


def _sections(backend: str, precision: str, model_bytes: bytes, onnx: Callable[[str], bytes], batch: int | None,
              size: int) -> dict[str, bytes]:
    """onnx(part) -> bytes (export_onnx's parts), exported once per part."""
    if backend == "torch":
        return {"model": model_bytes}
    if backend == "tensorrt":
        return {"tensorrt_plan": _tensorrt_plan(onnx("full"), precision, batch, size)}
    # CPU backends: the graph ends at the per-scale maps, engine.native fuses them
    if precision in STAGE_PRECISIONS:
        return {"onnx_backbone": onnx("backbone"), "onnx_flow": onnx("flow")}
    return {"onnx": onnx("maps")}


def _openvino_has_bf16() -> bool:
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _precisions(backend: str) -> list[str]:
    """What --precision may name for a backend, fastest-first where auto should try them in that order."""
    return {"openvino": ["bf16", "bf16-flow", "fp16", "fp32"], "onnxruntime": ["fp32"],
            "torch": ["bf16", "fp16", "fp32"] if torch.cuda.is_available() else ["fp32"],
            "tensorrt": ["bf16", "fp16", "fp32"]}[backend]


def _auto_candidates(backend: str, real_images: bool) -> list[str]:
    """--precision auto: low precisions the hardware runs natively, fastest first, each kept only if it passes the
    accuracy check; fp32 last. On CPUs without bf16 OpenVINO would run "bf16" in fp32: it is not tried there.

    OpenVINO's all-bf16 needs real check images (--calib): a bf16 backbone moved MTD maps by up to 2.4 units
    and image AUROC from 0.9715 to 0.9503, while on random images it stayed near the tolerance (benchmarks/NOTES.md).
    """
    if backend == "openvino":
        if not _openvino_has_bf16():
            return ["fp32"]
        return ["bf16", "bf16-flow", "fp32"] if real_images else ["bf16-flow", "fp32"]
    return [p for p in _precisions(backend) if p != "fp32"][:1] + ["fp32"]


def build_engine(model: FastFlow, meta: dict, model_bytes: bytes, out: Path, backend: str = "auto",
                 precision: str = "auto", batch: int | None = None, calib: str | None = None) -> dict:
    """Build and write the engine; returns its header (what was checked, with numbers)."""
    size = model.config.input_size
    graph = InferenceGraph(model).eval()
    images, calib_desc = _calibration_images(calib, size)
    rng = np.random.default_rng(1)
    check_images = np.concatenate([images, rng.random((2, 3, size, size), dtype=np.float32)])
    with torch.no_grad():
        ref_maps, ref_scores = (t.numpy() for t in model(torch.from_numpy(check_images)))
        graph_check = _compare(lambda x: tuple(t.numpy() for t in graph(torch.from_numpy(x))), ref_maps, ref_scores,
                               check_images, None)
    print(f"folded graph vs PyTorch reference: max |map diff| {graph_check['max_map_diff']:.2e}, "
          f"max |score diff| {graph_check['max_score_diff']:.2e} ({calib_desc} + 2 random)")
    if graph_check["max_map_diff"] > GRAPH_TOLERANCE or graph_check["max_score_diff"] > GRAPH_TOLERANCE:
        raise RuntimeError(f"the folded inference graph disagrees with the reference beyond {GRAPH_TOLERANCE}: "
                           f"{graph_check}; this is a lineflow bug, please report it")
    exports: dict[str, bytes] = {}

    def onnx(part: str) -> bytes:
        if part not in exports:
            exports[part] = export_onnx(graph, batch, part)
        return exports[part]
    threshold = meta.get("threshold", {}).get("threshold")
    if threshold is None:
        raise UserError("model.pt has no decision threshold (train it with python -m train.fit)")
    header = {"input_size": size, "threshold": threshold, "batch": batch, "model_config": model.config.to_dict(),
              "model_threshold": meta.get("threshold"), "created": datetime.now(UTC).isoformat(),
              "built_on": {"python": platform.python_version(), "machine": platform.machine(),
                           "torch": torch.__version__},
              "checks": {"graph_vs_reference": graph_check, "check_images": calib_desc},
              "scoring": graph.scoring_spec()}
    installed = available_backends()
    if backend != "auto" and backend not in installed:
        raise UserError(f"backend {backend} is not installed here (installed: {', '.join(installed)})")
    if backend == "tensorrt" and not torch.cuda.is_available():
        raise UserError("backend tensorrt needs an NVIDIA GPU; none is visible to PyTorch")
    if backend == "auto" and torch.cuda.is_available():
        backend = "tensorrt" if "tensorrt" in installed else "torch"  # torch: cuDNN + Triton kernels
    if backend != "auto":
        allowed = _precisions(backend)
        if precision != "auto" and precision not in allowed:
            raise UserError(f"--precision {precision} is not available for {backend} "
                            f"(choose from {', '.join(allowed)})")

    def checked(name: str) -> tuple[str, dict[str, bytes], Callable]:
        """The first of the backend's candidate precisions that passes the accuracy check."""
        candidates = [precision] if precision != "auto" else _auto_candidates(name, calib is not None)
        for prec in candidates:
            sections = _sections(name, prec, model_bytes, onnx, batch, size)
            run = load_backend({**header, "backend": name, "precision": prec}, sections)
            check = _compare(run, ref_maps, ref_scores, check_images, batch)
            tol = {"score": GRAPH_TOLERANCE, "map": GRAPH_TOLERANCE} if prec == "fp32" else LOW_PRECISION_TOLERANCE
            ok = check["max_score_diff"] <= tol["score"] and check["max_map_diff"] <= tol["map"]
            print(f"{name} {prec} vs PyTorch reference: max |map diff| {check['max_map_diff']:.2e}, "
                  f"max |score diff| {check['max_score_diff']:.2e} (tolerance {tol['map']:g} / {tol['score']:g}): "
                  f"{'ok' if ok else 'outside tolerance'}")
            header["checks"][f"{name}_{prec}_vs_reference"] = {**check, "tolerance": tol, "ok": ok}
            if ok:
                return prec, sections, run
            if prec == "fp32" or precision != "auto":
                raise RuntimeError(f"{name} {prec} disagrees with the PyTorch reference beyond tolerance: {check}")
            print(f"  {prec} is outside tolerance: trying {candidates[candidates.index(prec) + 1]}")
        raise AssertionError("unreachable: fp32 is every backend's last candidate")

    if backend == "auto":  # no GPU: each installed CPU backend at its checked precision, timed; the fastest wins
        cpu = [b for b in ("openvino", "onnxruntime") if b in installed] or ["torch"]
        if precision != "auto":
            cpu = [b for b in cpu if precision in _precisions(b)]
            if not cpu:
                raise UserError(f"--precision {precision}: no installed CPU backend offers it")
        options, timings = {}, {}
        for name in cpu:
            options[name] = checked(name)
            timings[name] = _median_ms(options[name][2], check_images[:batch or 1])
        print("auto: " + ", ".join(f"{name} {options[name][0]} {ms:.1f} ms/frame" for name, ms in timings.items())
              + f" (batch {batch or 1}, median of 5)")
        header["checks"]["auto_timings_ms"] = {f"{name} {options[name][0]}": ms for name, ms in timings.items()}
        backend = min(timings, key=timings.get)
        prec, sections, run = options[backend]
    else:
        prec, sections, run = checked(backend)
    header.update(backend=backend, precision=prec)
    if backend not in ("onnxruntime", "openvino"):
        del header["scoring"]  # fused in the graph (tensorrt) or in the model (torch)
    header["checks"]["ms_per_frame_batch1"] = _median_ms(run, check_images[:1] if not batch else check_images[:batch])
    write_engine(out, header, sections)
    return header


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model.pt written by python -m train.fit")
    p.add_argument("-o", "--out", help="engine file to write (default: the model's name with .engine)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="auto: TensorRT on an NVIDIA GPU, else the fastest installed CPU backend, timed here")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf16-flow", "fp16"],
                   help="bf16-flow: OpenVINO runs the backbone in fp32 and the flow in bf16. auto: the first of "
                        "bf16 (OpenVINO only with --calib), bf16-flow, fp16 that the hardware runs natively and that "
                        "stays within tolerance of fp32 on the check images, else fp32")
    p.add_argument("--batch", type=int, default=0, help="fixed batch size; 0 = any batch size")
    p.add_argument("--calib", metavar="DIR", help="folder of good images for the accuracy checks "
                   "(default: random images, which check the arithmetic but not real-image precision)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    model_path = Path(args.model)
    out = Path(args.out) if args.out else model_path.with_suffix(".engine")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; -o takes a file name")
    if not out.resolve().parent.is_dir():
        raise UserError(f"{out.parent}: folder does not exist")
    if args.batch < 0:
        raise UserError("--batch must be 0 (any) or a positive batch size")
    if not model_path.is_file():
        raise UserError(f"{model_path}: no such file")
    model_bytes = model_path.read_bytes()  # read once: the engine carries exactly what was checked
    model, meta = load_model_bytes(io.BytesIO(model_bytes), str(model_path))
    t0 = time.perf_counter()
    header = build_engine(model, meta, model_bytes, out, args.backend, args.precision, args.batch or None, args.calib)
    print(f"wrote {out}: {header['backend']} {header['precision']}, {header['input_size']} px, "
          f"batch {header['batch'] or 'any'}, threshold {header['threshold']:.4f}, "
          f"{header['checks']['ms_per_frame_batch1']:.1f} ms/frame here ({time.perf_counter() - t0:.0f} s to build)")
    return 0


if __name__ == "__main__":
    run_cli(main)
