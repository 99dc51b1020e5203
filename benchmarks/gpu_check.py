"""The GPU check of issue 20: the engine end to end on CUDA against the CPU engine, and the speed table.

    python -m benchmarks.gpu_check --model gpu-carry/model.pt --images gpu-carry/mtd/test --out results.json

Run by benchmarks/gpu_check.sh on a machine with an NVIDIA GPU (not in CI, which has none). Per model
(the trained default model carried with the tree, lite2 at 256²; lite0 and resnet18 of the same
configuration with random weights, for speed; their results still must equal the CPU engine's):
1. engine.build --backend torch (the CUDA path: cuDNN backbone, fused Triton flow and scoring, CUDA
   graphs) in fp32 and bf16, TensorRT where it is installed, and ONNX Runtime on the CPU as the reference;
   every frame of the real images through both engines: max |map diff| and |score diff| (fp32 1e-4, bf16
   the build's LOW_PRECISION_TOLERANCE).
2. Speed through Engine.infer (uint8 frames in, native preprocessing, the pinned upload, the CUDA graph,
   the download, results out): batch 1, 8, 32, 128, median ms per call and frames/s; the GPU stages alone
   (backbone, flow, scoring, in CUDA graphs); each fused kernel against its floor (benchmarks/gpu_bench.py).
Prints markdown tables meant for benchmarks/NOTES.md as they are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import engine
from benchmarks import gpu_bench, stages
from engine.builder import BuildConfig, build_engine
from engine.builder.builder import LOW_PRECISION_TOLERANCE
from engine.builder.graph import InferenceGraph
from engine.builder.kernel_pack import kernel_graph
from engine.common.images import images_in, read_image
from train.checkpoint import ModelMeta, load_model, save_model
from train.model import FlowConfig

BATCHES = (1, 8, 32, 128)
TARGET_MS_BATCH1 = 1.5  # issue 20's targets, for the table
TARGET_FPS_BATCH128 = {"efficientnet_lite2": 8000, "resnet18": 5000}


def _models(model_path: Path, folder: Path) -> list[tuple[str, Path]]:
    """(label, model.pt): the carried trained model, then lite0 and resnet18 of its configuration, random weights."""
    trained, meta = load_model(model_path)
    out = [(f"{trained.config.backbone} (trained, {model_path.name})", model_path)]
    for backbone in ("efficientnet_lite0", "resnet18"):
        cfg = FlowConfig(**{**trained.config.to_dict(), "backbone": backbone})
        path = folder / f"{backbone}.pt"
        save_model(path, stages.make_model(cfg), ModelMeta(threshold=meta.threshold))
        out.append((f"{backbone} (random weights)", path))
    return out


def _build(model_path: Path, out: Path, backend: str, precision: str, calib: Path) -> Path:
    model, meta = load_model(model_path)
    build_engine(model, meta, model_path.read_bytes(), out, BuildConfig(backend=backend, precision=precision,
                                                                         calib=str(calib)))
    return out


def _compare(engine_path: Path, reference_path: Path, frames: list[np.ndarray]) -> dict:
    with engine.load(engine_path) as eng, engine.load(reference_path) as ref:
        got, want = eng.infer(frames), ref.infer(frames)
    return {"max_map_diff": max(float(np.abs(g.anomaly_map - w.anomaly_map).max()) for g, w in zip(got, want)),
            "max_score_diff": max(abs(g.score - w.score) for g, w in zip(got, want)),
            "verdicts_equal": sum(g.is_anomalous == w.is_anomalous for g, w in zip(got, want)), "frames": len(got)}


def _speed(engine_path: Path, hw: tuple[int, int], repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    with engine.load(engine_path) as eng:
        for batch in BATCHES:
            frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(batch)]
            for _ in range(3):  # capture of the CUDA graph for this batch, cuDNN's and Triton's autotuning
                eng.infer(frames)
            torch.cuda.synchronize()
            times, pre = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                eng.infer(frames)
                times.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                eng.prepare(frames)
                pre.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            rows.append({"batch": batch, "ms": ms, "frames_per_s": batch / ms * 1e3,
                         "preprocess_ms": statistics.median(pre)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained model.pt (the default configuration)")
    p.add_argument("--images", required=True, help="a folder of real images (its subfolders too)")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--kernel-batch", type=int, default=32)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    paths = sorted(p for d in [Path(args.images), *sorted(Path(args.images).rglob("*"))] if d.is_dir()
                   for p in images_in(d))
    frames = [(read_image(p) * 255).round().astype(np.uint8) for p in paths]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tensorrt": has_trt,
              "frames": len(frames), "ceilings": gpu_bench.ceilings(), "models": []}
    c = result["ceilings"]
    print(f"{result['device']}, torch {torch.__version__}, TensorRT {'present' if has_trt else 'absent'}; "
          f"copy {c['copy_GBps']:.0f} GB/s, bf16 GEMM {c['bf16_TFLOPs']:.0f} TFLOP/s; {len(frames)} real images",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        calib = paths[0].parent  # the build's accuracy check reads one folder's images
        for label, model_path in _models(Path(args.model), folder):
            model, _ = load_model(model_path)
            entry = {"model": label, "input_size": list(model.config.input_size), "accuracy": {}, "speed": {}}
            reference = _build(model_path, folder / "ref.engine", "onnxruntime", "fp32", calib)
            variants = [("torch", "fp32"), ("torch", "bf16")] + ([("tensorrt", "fp16")] if has_trt else [])
            for backend, precision in variants:
                name = f"{backend} {precision}"
                try:
                    built = _build(model_path, folder / f"{backend}-{precision}.engine", backend, precision, calib)
                except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others' numbers
                    entry["accuracy"][name] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"{label} {name}: build failed: {e}", flush=True)
                    continue
                entry["accuracy"][name] = _compare(built, reference, frames)
                entry["speed"][name] = _speed(built, tuple(model.config.input_size), args.repeats)
                print(f"{label} {name}: {json.dumps(entry['accuracy'][name])}", flush=True)
            graph = InferenceGraph(model).cuda().eval()
            kg = kernel_graph(model, "bf16").cuda().eval()
            entry["stages"] = [gpu_bench.stage_split(kg, label, b) for b in (1, 128)]
            entry["kernels"] = gpu_bench.kernel_rows(graph, kg, args.kernel_batch, c, label)
            result["models"].append(entry)
            Path(args.out).write_text(json.dumps(result, indent=1))
            torch.cuda.empty_cache()
    print_tables(result)


def print_tables(result: dict) -> None:
    print(f"\n### GPU check: {result['device']}, torch {result['torch']}, TensorRT "
          f"{'present' if result['tensorrt'] else 'absent (the static graph test stands in)'}\n")
    print("Accuracy against the CPU engine (ONNX Runtime fp32), every real image "
          f"({result['frames']}); tolerance fp32 1e-4, bf16/fp16 map {LOW_PRECISION_TOLERANCE['map']}, "
          f"score {LOW_PRECISION_TOLERANCE['score']}:\n")
    print("| model | engine | max map diff | max score diff | same verdict |\n|---|---|---|---|---|")
    for m in result["models"]:
        for name, a in m["accuracy"].items():
            if "error" in a:
                print(f"| {m['model']} | {name} | build failed: {a['error'][:120]} | | |")
            else:
                print(f"| {m['model']} | {name} | {a['max_map_diff']:.2e} | {a['max_score_diff']:.2e} | "
                      f"{a['verdicts_equal']}/{a['frames']} |")
    print("\nEnd to end through Engine.infer (uint8 frames of the input size, preprocessing, upload, CUDA graph, "
          "download), median ms per call:\n")
    print("| model | engine | batch | ms | frames/s | of which CPU preprocessing ms |\n|---|---|---|---|---|---|")
    for m in result["models"]:
        for name, rows in m["speed"].items():
            for r in rows:
                print(f"| {m['model']} | {name} | {r['batch']} | {r['ms']:.3f} | {r['frames_per_s']:.0f} | "
                      f"{r['preprocess_ms']:.3f} |")
    print("\nGPU stages alone (bf16 kernels, CUDA graphs), ms:\n")
    print("| model | batch | backbone | flow | scoring | whole |\n|---|---|---|---|---|---|")
    for m in result["models"]:
        for r in m["stages"]:
            print(f"| {m['model']} | {r['batch']} | {r['backbone_ms']:.3f} | {r['flow_ms']:.3f} | "
                  f"{r['scoring_ms']:.3f} | {r['whole_ms']:.3f} |")
    print("\nFused kernels against their floor (max of FLOPs / bf16 GEMM rate, bytes / copy rate), us:\n")
    print("| model | scale | step | conv_relu (floor) | fraction | coupling (floor) | fraction |\n"
          "|---|---|---|---|---|---|---|")
    for m in result["models"]:
        for r in m["kernels"]:
            if r["step"] == "scoring":
                print(f"| {m['model']} | all | scoring | {r['score_ms'] * 1e3:.1f} ({r['score_floor_ms'] * 1e3:.1f}) | "
                      f"{r['score_floor_ms'] / r['score_ms']:.2f} | | |")
            else:
                print(f"| {m['model']} | {r['scale']} {r['hw']}x{r['c']} k{r['kernel']} | {r['step']} | "
                      f"{r['conv_relu_ms'] * 1e3:.1f} ({r['conv_relu_floor_ms'] * 1e3:.1f}) | "
                      f"{r['conv_relu_floor_ms'] / r['conv_relu_ms']:.2f} | {r['coupling_ms'] * 1e3:.1f} "
                      f"({r['coupling_floor_ms'] * 1e3:.1f}) | {r['coupling_floor_ms'] / r['coupling_ms']:.2f} |")
    print(f"\nTargets (issue 20): <= {TARGET_MS_BATCH1} ms at batch 1; >= "
          + ", ".join(f"{v} frames/s at batch 128 for {k}" for k, v in TARGET_FPS_BATCH128.items()))


if __name__ == "__main__":
    main()
