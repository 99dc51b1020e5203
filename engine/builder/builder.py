"""build_engine: a trained model -> one checked engine file (the work behind python -m engine.build).

In steps, each a function below that returns what it found (and the numbers for the header):
reference (the model folded into its inference graph, graph.py, checked against the model itself),
candidates (the backends and precisions to try), check (each candidate exported and compiled for its
backend, export.py, loaded and compared with the reference), timings and choose (of the candidates
within tolerance, the fastest), write (the engine file, engine/format.py, with a typed header,
engine/header.py, that records every check's numbers).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from engine.backends import Backend, available_backends, load_backend, run_batched
from engine.builder.export import engine_sections
from engine.builder.graph import InferenceGraph
from engine.common.errors import RunError, UserError, one_line
from engine.common.images import images_in, read_image
from engine.format import write_engine
from engine.header import (
    BACKEND_PRECISIONS,
    BACKENDS,
    CPU_BACKENDS,
    INT8_PRECISIONS,
    MAPS_GRAPH_BACKENDS,
    PART_PRECISIONS,
    PRECISIONS,
    EngineHeader,
    TilingSpec,
)
from engine.preprocess import frames_to_input
from engine.scoring import ScoringSpec
from train.checkpoint import ModelMeta
from train.model import FastFlow, FlowConfig
from train.tiles import frame_tiles

__all__ = ["BuildConfig", "build_engine", "reference", "candidates", "check", "checked", "timings", "choose_precision",
           "per_backend", "choose", "write", "Reference", "Candidate", "BUILD_BACKENDS", "BUILD_PRECISIONS",
           "GRAPH_TOLERANCE", "LOW_PRECISION_TOLERANCE", "openvino_capabilities"]

GRAPH_TOLERANCE = 1e-4  # max |map difference|, folded graph or fp32 engine vs the reference (relative above 1)
LOW_PRECISION_TOLERANCE = {"score": 0.02, "map": 0.1}  # bf16/fp16 vs fp32, in map units (1 = q99 of good pixels)
BUILD_BACKENDS = ("auto", *BACKENDS)
BUILD_PRECISIONS = ("auto", *PRECISIONS)
# --precision auto keeps a lower precision only when it is this much faster than the most precise one timed within
# the margin: at equal speed the more accurate engine wins (bf16-flow and fp32 timed level on an AMX Xeon, and the
# choice flipped between builds on timing noise, benchmarks/NOTES.md)
PRECISION_MARGIN = 0.05
# pause before each timed call when candidates take turns: ONNX Runtime's worker threads keep spinning for about
# this long after its calls and slow an OpenVINO call timed right after one (benchmarks/NOTES.md, "bf16 from the
# backbone's stride-4 map on", the build's timing in turns)
SETTLE_S = 0.5


@dataclass(frozen=True)
class BuildConfig:
    """How to build: never mutated by the build; what was chosen for `auto` is in the engine's header."""

    backend: str = "auto"  # auto: TensorRT on an NVIDIA GPU (the CUDA path where it fails), else the fastest CPU one
    precision: str = "auto"  # auto: the fastest precision the hardware runs natively that passes the check
    batch: int | None = None  # a fixed batch size; None = any
    calib: str | None = None  # a folder of good images for the checks (default: random images)

    def __post_init__(self):
        if self.backend not in BUILD_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BUILD_BACKENDS)}, not {self.backend!r}")
        if self.precision not in BUILD_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(BUILD_PRECISIONS)}, not {self.precision!r}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"batch must be a positive batch size or None (any), not {self.batch!r}")


def _calibration_images(calib: str | None, model_config: FlowConfig, limit: int = 32) -> tuple[np.ndarray, str]:
    """Real images for the build's checks (and int8's ranges): --calib DIR, as the engine's inputs (a tiled
    model's tiles at its scale, spread over the frames), else random images (said so in the header)."""
    hw = model_config.input_size
    if calib is None:
        rng = np.random.default_rng(0)
        return rng.random((4, 3, *hw), dtype=np.float32), "4 random images (no --calib given)"
    folder = Path(calib)
    if not folder.is_dir():
        raise UserError(f"{folder}: --calib needs a folder of good images")
    paths = images_in(folder)
    if not paths:
        raise UserError(f"{folder}: no images found for --calib")
    paths = paths[:: max(1, len(paths) // limit)][:limit]
    if not model_config.tile_scale:
        return frames_to_input([read_image(p) for p in paths], hw), f"{len(paths)} images from {folder}"
    tiles = torch.cat([frame_tiles(read_image(p), model_config)[0] for p in paths])
    tiles = tiles[np.linspace(0, len(tiles) - 1, min(limit, len(tiles))).round().astype(int)]
    return tiles.numpy(), f"{len(tiles)} tiles of {len(paths)} images from {folder}"


def _compare(infer: Callable, ref_maps: np.ndarray, ref_scores: np.ndarray, images: np.ndarray,
             batch: int | None) -> dict:
    maps, scores = run_batched(infer, images, batch)
    # in map units, relative where the map exceeds 1: float32 keeps ~7 digits, and a random image
    # scores in the hundreds (good images stay near 0..1, where this is the absolute difference)
    map_scale = np.maximum(1.0, np.abs(ref_maps).reshape(len(ref_maps), -1).max(axis=1))
    map_diff = np.abs(maps - ref_maps).reshape(len(maps), -1).max(axis=1) / map_scale
    score_diff = np.abs(scores - ref_scores) / np.maximum(1.0, np.abs(ref_scores))
    return {"max_map_diff": float(map_diff.max()), "max_score_diff": float(score_diff.max())}


def _ms_per_frame(infers: dict[str, Callable], images: np.ndarray, batch: int | None,
                  rounds: int = 7, settle_s: float = SETTLE_S) -> dict[str, float]:
    """Median time of one call on a batch of the engine's size (1 for any-batch engines), per frame, for each
    candidate, timed in turns (round after round) so that a machine's drift falls on all of them alike, each
    call after `settle_s` of rest so that no candidate's threads are still busy from its turn."""
    n = batch or 1
    images = np.resize(images, (n, *images.shape[1:]))  # as many images as the engine takes, repeated
    times: dict[str, list[float]] = {name: [] for name in infers}
    for infer in infers.values():
        infer(images)
    for _ in range(rounds):
        for name, infer in infers.items():
            if len(infers) > 1:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            infer(images)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) / n for name, t in times.items()}


def _keep_precision(ms: dict[str, float]) -> str:
    """Of the precisions that passed (`ms` lowest precision first, as tried), the most precise one within
    PRECISION_MARGIN of the fastest."""
    fastest = min(ms.values())
    return [p for p, t in ms.items() if t <= fastest * (1 + PRECISION_MARGIN)][-1]


def openvino_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin runs natively here (OPTIMIZATION_CAPABILITIES: FP32, BF16, INT8, ...)."""
    import openvino as ov
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


# the OpenVINO CPU capability (OPTIMIZATION_CAPABILITIES) each precision needs, that of its lowest part: without
# it OpenVINO silently runs fp32
_OPENVINO_NEEDS = {p: next(q for q in ("int8", "fp16", "bf16", "fp32") if q in parts.values()).upper()
                   for p, parts in PART_PRECISIONS.items()}


def _gpu_visible() -> bool:
    """Whether the build targets an NVIDIA GPU (tests/test_tensorrt.py pretends so, with a fake TensorRT)."""
    return torch.cuda.is_available()


def _precisions(backend: str) -> list[str]:
    """What --precision may name for a backend here, fastest first (the order auto tries them in): only the
    precisions this machine runs natively, so that an engine's stated precision is the one it runs."""
    if backend == "torch" and not torch.cuda.is_available():
        return ["fp32"]  # the PyTorch reference on the CPU
    if backend == "openvino":
        caps = openvino_capabilities()
        return [p for p in BACKEND_PRECISIONS[backend] if _OPENVINO_NEEDS.get(p, "FP32") in caps]
    return list(BACKEND_PRECISIONS[backend])


def _precision_refusal(backend: str, precision: str) -> str:
    """Why `precision` cannot be built for `backend` here, in one line."""
    if backend == "openvino" and precision in _OPENVINO_NEEDS:
        return (f"--precision {precision}: this CPU has no native {_OPENVINO_NEEDS[precision]} (OpenVINO reports "
                f"{', '.join(openvino_capabilities())}), so OpenVINO would run fp32 under a {precision} label; "
                f"choose from {', '.join(_precisions(backend))}, or auto")
    if backend == "torch" and not torch.cuda.is_available():
        return f"--precision {precision}: the torch backend on a CPU is the fp32 reference; use fp32"
    return f"--precision {precision} is not available for {backend} (choose from {', '.join(_precisions(backend))})"


def _auto_candidates(backend: str, real_images: bool) -> list[str]:
    """--precision auto: the low precisions the hardware runs natively, then fp32; each must pass the accuracy check,
    and of those that do the build keeps the fastest, timed on this machine. On CPUs without bf16 OpenVINO would
    run "bf16" in fp32: it is not tried there.

    OpenVINO's all-bf16 and bf16-deep need real check images (--calib): a bf16 backbone moved MTD maps by up to
    2.4 units and image AUROC from 0.9715 to 0.9503, while on random images it stayed near the tolerance; bf16-deep
    keeps the layers to the stride-4 map, where that error came from, in fp32 (benchmarks/NOTES.md).
    int8 takes its ranges from the check images, so it too is tried only on real ones, and only int8-backbone: an
    int8 flow moved MTD maps by 0.39 units and rejected 89 % of good images (benchmarks/NOTES.md).
    """
    if backend == "openvino":
        needs_real = ("bf16", "bf16-deep", *INT8_PRECISIONS)
        low = [p for p in ("int8-backbone", "bf16", "bf16-deep", "bf16-flow")
               if p in _precisions(backend) and (real_images or p not in needs_real)]
        return [*low, "fp32"]
    return [p for p in _precisions(backend) if p != "fp32"][:1] + ["fp32"]


def _resolve_backend(backend: str, precision: str) -> tuple[list[str], bool]:
    """The backends to build and check, and whether they are fallbacks (the first that builds wins) rather than
    rivals (all built and timed): one named backend; for auto on a GPU TensorRT, then the CUDA path (torch:
    cuDNN + the Triton kernels) should the plan fail; for auto without one every installed CPU backend."""
    installed = available_backends()
    if backend != "auto" and backend not in installed:
        raise UserError(f"backend {backend} is not installed here (installed: {', '.join(installed)})")
    if backend == "tensorrt" and not _gpu_visible():
        raise UserError("backend tensorrt needs an NVIDIA GPU; none is visible to PyTorch")
    fallbacks = backend == "auto" and _gpu_visible()
    if fallbacks:
        candidates = ["tensorrt", "torch"] if "tensorrt" in installed else ["torch"]
    elif backend == "auto":
        candidates = [b for b in CPU_BACKENDS if b in installed] or ["torch"]
    else:
        candidates = [backend]
    if precision != "auto":
        allowed = [b for b in candidates if precision in _precisions(b)]
        if not allowed:
            raise UserError("; ".join(_precision_refusal(b, precision) for b in candidates))
        candidates = allowed
    return candidates, fallbacks


@dataclass(frozen=True)
class Reference:
    """What every candidate is checked against: the folded graph, the check images, the model's outputs on them."""

    graph: InferenceGraph
    images: np.ndarray  # the check images proper (real ones with --calib): int8 takes its ranges from them
    check_images: np.ndarray  # those and 2 random ones
    description: str  # what the check images are, for the header
    maps: np.ndarray
    scores: np.ndarray


@dataclass
class Candidate:
    """One engine the build could write: a backend at a precision, its sections, loaded, and its check's numbers."""

    backend: str
    precision: str
    sections: dict[str, bytes]
    runner: Backend
    check: dict  # max |map diff|, max |score diff|, tolerance, ok

    @property
    def ok(self) -> bool:
        return self.check["ok"]


def reference(model: FastFlow, config: BuildConfig) -> tuple[Reference, dict]:
    """The folded graph, checked against the model on the check images (+ 2 random ones); its check's record."""
    graph = InferenceGraph(model).eval()
    images, description = _calibration_images(config.calib, model.config)
    check_images = np.concatenate([images, np.random.default_rng(1).random((2, 3, *graph.size), dtype=np.float32)])
    with torch.no_grad():
        maps, scores = (t.numpy() for t in model(torch.from_numpy(check_images)))
        graph_check = _compare(lambda x: tuple(t.numpy() for t in graph(torch.from_numpy(x))), maps, scores,
                               check_images, None)
    print(f"folded graph vs PyTorch reference: max |map diff| {graph_check['max_map_diff']:.2e}, "
          f"max |score diff| {graph_check['max_score_diff']:.2e} ({description} + 2 random)")
    if graph_check["max_map_diff"] > GRAPH_TOLERANCE or graph_check["max_score_diff"] > GRAPH_TOLERANCE:
        raise RunError(f"the folded inference graph disagrees with the reference beyond {GRAPH_TOLERANCE}: "
                       f"max |map diff| {graph_check['max_map_diff']:.2e}, max |score diff| "
                       f"{graph_check['max_score_diff']:.2e}; this is a lineflow bug, please report it")
    ref = Reference(graph, images, check_images, description, maps, scores)
    return ref, {"graph_vs_reference": graph_check, "check_images": description}


def candidates(backend: str, config: BuildConfig) -> list[str]:
    """The precisions to try for a backend, in order: the one named, or --precision auto's (_auto_candidates)."""
    return [config.precision] if config.precision != "auto" else _auto_candidates(backend, config.calib is not None)


def check(backend: str, precision: str, ref: Reference, spec: _HeaderSpec, model_bytes: bytes,
          exported: dict[str, bytes]) -> Candidate:
    """Build the candidate's sections (exported: ONNX parts already made, reused), load them and compare its outputs
    with the model's on the check images; prints one line."""
    sections = engine_sections(backend, precision, model_bytes, ref.graph, spec.batch, exported, ref.images)
    runner = load_backend(spec.header(backend, precision), sections)
    result = _compare(runner.infer, ref.maps, ref.scores, ref.check_images, spec.batch)
    tol = {"score": GRAPH_TOLERANCE, "map": GRAPH_TOLERANCE} if precision == "fp32" else LOW_PRECISION_TOLERANCE
    ok = result["max_score_diff"] <= tol["score"] and result["max_map_diff"] <= tol["map"]
    print(f"{backend} {precision} vs PyTorch reference: max |map diff| {result['max_map_diff']:.2e}, "
          f"max |score diff| {result['max_score_diff']:.2e} (tolerance {tol['map']:g} / {tol['score']:g}): "
          f"{'ok' if ok else 'outside tolerance'}")
    return Candidate(backend, precision, sections, runner, {**result, "tolerance": tol, "ok": ok})


def checked(backend: str, ref: Reference, config: BuildConfig, spec: _HeaderSpec, model_bytes: bytes,
            exported: dict[str, bytes]) -> tuple[list[Candidate], dict]:
    """Each candidate precision of a backend, checked in order: those within tolerance, and every check's record.
    A precision named, or fp32, outside tolerance ends the build (RunError); auto's lower ones give way to the next."""
    precisions, passed, records = candidates(backend, config), [], {}
    for precision in precisions:
        candidate = check(backend, precision, ref, spec, model_bytes, exported)
        records[f"{backend}_{precision}_vs_reference"] = candidate.check
        if candidate.ok:
            passed.append(candidate)
            continue
        candidate.runner.close()
        if precision == "fp32" or config.precision != "auto":
            c, tol = candidate.check, candidate.check["tolerance"]
            advice = ("this is a lineflow bug, please report it" if precision == "fp32" else
                      "build with --precision auto or fp32 (check on your own images with --calib DIR)")
            raise RunError(f"{backend} {precision} disagrees with the PyTorch reference beyond tolerance: max |map "
                           f"diff| {c['max_map_diff']:.2e} (tolerance {tol['map']:g}), max |score diff| "
                           f"{c['max_score_diff']:.2e} (tolerance {tol['score']:g}); no engine written; {advice}")
        print(f"  {precision} is outside tolerance: trying {precisions[precisions.index(precision) + 1]}")
    return passed, records


def timings(candidates: dict[str, Candidate], ref: Reference, batch: int | None) -> dict[str, float]:
    """ms per frame of each candidate, by name, timed in turns on the check images (_ms_per_frame)."""
    return _ms_per_frame({name: c.runner.infer for name, c in candidates.items()}, ref.check_images, batch)


def choose_precision(backend: str, passed: list[Candidate], ref: Reference, batch: int | None
                     ) -> tuple[Candidate, dict]:
    """Of a backend's precisions within tolerance, the fastest (timed here: bf16 is not faster on every CPU that runs
    it natively, benchmarks/peers/README.md), or the most precise within PRECISION_MARGIN of it; the others closed."""
    if len(passed) == 1:
        return passed[0], {}
    ms = timings({c.precision: c for c in passed}, ref, batch)
    kept = _keep_precision(ms)
    print(f"{backend} precisions within tolerance: " + ", ".join(f"{p} {t:.1f} ms/frame" for p, t in ms.items())
          + f" (batch {batch or 1}, median of 7 in turns): keeps {kept}"
          + ("" if kept == min(ms, key=ms.get) else f", the most precise within {PRECISION_MARGIN:.0%} of the "
                                                    "fastest"))
    for c in passed:
        if c.precision != kept:
            c.runner.close()
    return next(c for c in passed if c.precision == kept), {f"{backend}_precision_timings_ms": ms}


def per_backend(names: list[str], fallbacks: bool, ref: Reference, config: BuildConfig, spec: _HeaderSpec,
                model_bytes: bytes) -> tuple[dict[str, Candidate], dict]:
    """Each backend's checked and chosen candidate, and the records. With fallbacks (auto on a GPU) the first that
    builds and passes its check wins, and why each before it failed is printed and recorded."""
    options, records, exported = {}, {}, {}
    for name in names:
        try:
            passed, checks = checked(name, ref, config, spec, model_bytes, exported)
            records.update(checks)
            options[name], timed = choose_precision(name, passed, ref, config.batch)
            records.update(timed)
        except Exception as e:  # noqa: BLE001 - any failure of a plan's build is a reason to fall back
            if not fallbacks or name == names[-1]:
                raise
            reason = str(e) if isinstance(e, (UserError, RunError)) else one_line(e)
            print(f"auto: {name} failed ({reason}); falling back to {names[names.index(name) + 1]}")
            records[f"auto_{name}_failed"] = reason
            continue
        if fallbacks:
            break
    return options, records


def choose(options: dict[str, Candidate], ref: Reference, batch: int | None) -> tuple[Candidate, dict]:
    """The fastest backend at its chosen precision (auto without a GPU times every installed CPU backend); all timed
    here (the header's ms/frame), every runner closed."""
    ms = timings(options, ref, batch)
    records = {}
    if len(options) > 1:
        print("auto: " + ", ".join(f"{name} {options[name].precision} {t:.1f} ms/frame" for name, t in ms.items())
              + f" (batch {batch or 1}, median of 7 in turns)")
        records["auto_timings_ms"] = {f"{name} {options[name].precision}": t for name, t in ms.items()}
    chosen = options[min(ms, key=ms.get)]
    for c in options.values():
        c.runner.close()
    parts = PART_PRECISIONS[chosen.precision] if chosen.backend in MAPS_GRAPH_BACKENDS else {"all": chosen.precision}
    return chosen, {**records, "ms_per_frame": ms[chosen.backend], "ms_per_frame_batch": batch or 1,
                    "part_precisions": parts}


@dataclass(frozen=True)
class _HeaderSpec:
    """What every header of this build says whichever candidate it describes."""

    model: FastFlow
    meta: ModelMeta
    scoring: ScoringSpec
    batch: int | None

    def header(self, backend: str, precision: str, checks: dict | None = None) -> EngineHeader:
        cfg, threshold = self.model.config, self.meta.threshold
        return EngineHeader(
            backend=backend, precision=precision, input_size=cfg.input_size, threshold=threshold.threshold,
            batch=self.batch, scoring=self.scoring,
            tiling=TilingSpec(cfg.tile_scale, cfg.tile_overlap, cfg.image_score_top) if cfg.tile_scale else None,
            model_config=cfg.to_dict(), model_threshold=threshold.to_dict(), checks=checks or {},
            input_stats=None if self.meta.input_stats is None else self.meta.input_stats.to_dict(),
            created=datetime.now(UTC).isoformat(),
            built_on={"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__})


def write(out: str | Path, chosen: Candidate, spec: _HeaderSpec, checks: dict) -> EngineHeader:
    """The chosen candidate's engine file, its header recording every check and timing."""
    header = spec.header(chosen.backend, chosen.precision, checks)
    write_engine(out, header, chosen.sections)
    return header


def build_engine(model: FastFlow, meta: ModelMeta | dict, model_bytes: bytes, out: str | Path,
                 config: BuildConfig = BuildConfig()) -> EngineHeader:
    """Build and write the engine; returns its header (what was chosen and checked, with numbers). In order:
    the reference, each backend's candidates checked (and its precisions timed), the backend chosen, the file
    written. `meta`: a ModelMeta, or its dict."""
    meta = ModelMeta.from_dict(meta) if isinstance(meta, dict) else meta
    if config.precision in INT8_PRECISIONS and config.calib is None:
        raise UserError(f"--precision {config.precision} takes its int8 ranges from real images: give --calib DIR "
                        "(a folder of good images)")
    if meta.threshold is None:
        raise UserError("model.pt has no decision threshold (train it with python -m train.fit)")
    ref, checks = reference(model, config)
    spec = _HeaderSpec(model, meta, ref.graph.scoring_spec(), config.batch)
    names, fallbacks = _resolve_backend(config.backend, config.precision)
    options, records = per_backend(names, fallbacks, ref, config, spec, model_bytes)
    chosen, timed = choose(options, ref, config.batch)
    return write(out, chosen, spec, {**checks, **records, **timed})
