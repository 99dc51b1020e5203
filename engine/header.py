"""The engine file's header: one typed, versioned schema, written by the build side and read by the run side.

The header is plain JSON in the file (engine/format.py); here it becomes an EngineHeader whose every
field is checked on reading, so a backend never meets a missing key or a wrong type. The section
names and what each backend needs of them are spelled here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.common.frame_stats import InputStats
from engine.common.geometry import MAX_SIDE
from engine.common.schema import hw_pair, integer, number, strict_kwargs
from engine.scoring import ScoringSpec

__all__ = ["EngineHeader", "TilingSpec", "Provenance",
           "BACKENDS", "PRECISIONS", "BACKEND_PRECISIONS", "CPU_BACKENDS", "MAPS_GRAPH_BACKENDS",
           "STAGE_PRECISIONS", "PART_PRECISIONS", "INT8_PRECISIONS",
           "SECTION_ONNX", "SECTION_ONNX_BACKBONE", "SECTION_ONNX_FLOW", "SECTION_ONNX_HEAD", "SECTION_ONNX_TAIL",
           "SECTION_TENSORRT_PLAN", "SECTION_MODEL", "SECTION_KERNELS",
           "required_sections", "MAX_BATCH", "MAX_BATCH_PIXELS"]

BACKENDS = ("openvino", "onnxruntime", "tensorrt", "torch")
PRECISIONS = ("fp32", "bf16", "bf16-deep", "bf16-flow", "fp16", "int8", "int8-backbone")
# what each backend can run, lowest precision first (torch: bf16 and fp16 on CUDA only; the build checks the device)
BACKEND_PRECISIONS = {"openvino": ("int8", "int8-backbone", "bf16", "bf16-deep", "bf16-flow", "fp16", "fp32"),
                      "onnxruntime": ("fp32",),
                      "tensorrt": ("bf16", "fp16", "fp32"), "torch": ("bf16", "fp16", "fp32")}
# the CPU backends that `engine.build --backend auto` times against each other where no GPU is visible
CPU_BACKENDS = ("openvino", "onnxruntime")
# backends whose graph ends at the per-scale maps, fused after it by the header's `scoring`: natively on CPUs
# (engine/native.py), in PyTorch on the GPU for TensorRT (its TopK is limited to k <= 3840, below a 256² map's 10 %)
MAPS_GRAPH_BACKENDS = ("openvino", "onnxruntime", "tensorrt")

SECTION_ONNX = "onnx"  # CPU backends: images -> per-scale NLL maps (fused natively after)
SECTION_ONNX_BACKBONE = "onnx_backbone"  # bf16-flow's first stage: images -> features
SECTION_ONNX_FLOW = "onnx_flow"  # ... features -> per-scale NLL maps
SECTION_ONNX_HEAD = "onnx_head"  # bf16-deep's first stage: images -> the backbone's stride-4 map
SECTION_ONNX_TAIL = "onnx_tail"  # ... the stride-4 map -> the rest of the backbone and the flow -> NLL maps
SECTION_TENSORRT_PLAN = "tensorrt_plan"  # a serialised TensorRT plan of the SECTION_ONNX graph
SECTION_MODEL = "model"  # the model.pt bytes (torch backend: rebuilt with train's classes)
SECTION_KERNELS = "kernels"  # torch backend: the folded flow as the CUDA path's kernels read it (arrays, .npz)

# precisions that run the graph as two stages, each its own section in its own precision: bf16-flow cuts between
# backbone and flow; bf16-deep after the backbone's stride-4 map, whose layers move MTD scores most in bf16
# (benchmarks/NOTES.md, 2026-12-05)
STAGE_PRECISIONS = {"bf16-flow": ((SECTION_ONNX_BACKBONE, "fp32"), (SECTION_ONNX_FLOW, "bf16")),
                    "bf16-deep": ((SECTION_ONNX_HEAD, "fp32"), (SECTION_ONNX_TAIL, "bf16"))}
# what each part of the graph runs in, per precision (the engine header's checks repeat it for the one built);
# int8: NNCF's quantize/dequantize pairs in the one ONNX graph around the convolutions of the int8 parts
PART_PRECISIONS = {"fp32": {"stem": "fp32", "backbone": "fp32", "flow": "fp32"},
                   "bf16": {"stem": "bf16", "backbone": "bf16", "flow": "bf16"},
                   "bf16-deep": {"stem": "fp32", "backbone": "fp32 to stride 4, bf16 after", "flow": "bf16"},
                   "bf16-flow": {"stem": "fp32", "backbone": "fp32", "flow": "bf16"},
                   "fp16": {"stem": "fp16", "backbone": "fp16", "flow": "fp16"},
                   "int8": {"stem": "fp32", "backbone": "int8", "flow": "int8"},
                   "int8-backbone": {"stem": "fp32", "backbone": "int8", "flow": "fp32"}}
# precisions quantized on the check images (engine/builder/quantize.py): they need real ones (--calib)
INT8_PRECISIONS = tuple(p for p, parts in PART_PRECISIONS.items() if "int8" in parts.values())


# Upper bounds on what a load allocates from the header, checked before anything is (an engine file is untrusted):
# the input's sides are at most engine.common.geometry.MAX_SIDE (as train's); a fixed batch (the load's self-test pads
# one frame to it) at most MAX_BATCH frames and MAX_BATCH_PIXELS input pixels (a 200 MB float32 batch at most); the
# scoring's maps are the input's size, each scale's no larger.
MAX_BATCH = 256
MAX_BATCH_PIXELS = 1 << 24


def required_sections(backend: str, precision: str) -> tuple[str, ...]:
    """The sections an engine of this backend and precision carries."""
    if backend == "torch":
        return (SECTION_MODEL, SECTION_KERNELS)
    if backend == "tensorrt":
        return (SECTION_TENSORRT_PLAN,)
    if precision in STAGE_PRECISIONS:
        return tuple(section for section, _ in STAGE_PRECISIONS[precision])
    return (SECTION_ONNX,)


@dataclass(frozen=True)
class TilingSpec:
    """How a tiling model's engine cuts frames and joins the tiles' maps (train/tiles.py is the reference):
    a frame is resized by `scale`, cut into input-sized tiles overlapping by `overlap` of a side
    (engine.common.geometry), the tiles' maps blended into one; the image score is the mean of the top
    `top_fraction` of the stitched score map's pixels."""

    scale: float
    overlap: float
    top_fraction: float

    def __post_init__(self):
        if not 0 < number("tiling.scale", self.scale) <= 16:
            raise ValueError("tiling.scale must be in (0, 16]")
        if not 0 <= number("tiling.overlap", self.overlap) <= 0.75:
            raise ValueError("tiling.overlap must be in [0, 0.75]")
        if not 0 <= number("tiling.top_fraction", self.top_fraction) < 1:
            raise ValueError("tiling.top_fraction must be in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict) -> TilingSpec:
        try:
            return cls(**strict_kwargs(cls, d))
        except TypeError as e:
            raise ValueError(f"tiling: {e}") from None


@dataclass(frozen=True)
class Provenance:
    """Where a retuned engine came from (engine.tune): the header's `provenance` object. The same compiled graph as
    the engine `parent` (its id, engine.format.engine_id), a threshold set by `rule` at `max_rejected` from
    `good_scores` good scores (its held-out ones and the labelled good frames'); `labels` counts the decisions used,
    `labels_sha256` hashes them; `parent_provenance`: the parent's own, when it was retuned too."""

    parent: str
    labels: dict  # {"good": count, "defect": count}
    labels_sha256: str
    rule: str
    max_rejected: float
    good_scores: int
    created: str  # when it was retuned, ISO 8601
    parent_provenance: dict | None = None

    def __post_init__(self):
        for name in ("parent", "labels_sha256", "rule", "created"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"provenance.{name} must be a string")
        if not isinstance(self.labels, dict) or sorted(self.labels) != ["defect", "good"]:
            raise ValueError("provenance.labels must be a JSON object of counts: good, defect")
        for kind, count in self.labels.items():
            integer(f"provenance.labels.{kind}", count, low=0)
        if not 0 <= number("provenance.max_rejected", self.max_rejected) < 1:
            raise ValueError("provenance.max_rejected must be in [0, 1)")
        integer("provenance.good_scores", self.good_scores)
        if self.parent_provenance is not None:
            Provenance.from_dict(self.parent_provenance)

    @classmethod
    def from_dict(cls, d: dict) -> Provenance:
        try:
            return cls(**strict_kwargs(cls, d, "provenance"))
        except TypeError as e:
            raise ValueError(f"provenance: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EngineHeader:
    """What a built engine is: how to run it (backend, precision, sizes, fusion) and what the build checked."""

    backend: str
    input_size: tuple[int, int]  # (height, width); an int N given here is N x N (the file holds a pair)
    threshold: float  # image scores above it are anomalous (set by train.fit on held-out good images)
    precision: str = "fp32"
    batch: int | None = None  # a fixed batch size, or None for any
    # the fusion after the per-scale maps: MAPS_GRAPH_BACKENDS after their graph, torch after its kernels on CUDA;
    # None: a torch engine built before format 8, without the kernels section (it runs on a CPU only)
    scoring: ScoringSpec | None = None
    tiling: TilingSpec | None = None  # a model trained on tiles: frames are cut and stitched; None: resized whole
    model_config: dict = field(default_factory=dict)  # train.model.FlowConfig.to_dict() of the model
    model_threshold: dict | None = None  # how the threshold was set (quantile, held-out images, ...)
    checks: dict = field(default_factory=dict)  # the build's accuracy checks and timings, with numbers
    input_stats: dict | None = None  # the training frames' statistics (InputStats.to_dict()); None: not recorded
    provenance: dict | None = None  # engine.tune's record (Provenance.to_dict()); None: as built
    created: str = ""
    built_on: dict = field(default_factory=dict)  # python, machine, torch of the build

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r} (known: {', '.join(BACKENDS)})")
        if self.precision not in BACKEND_PRECISIONS[self.backend]:
            raise ValueError(f"precision {self.precision!r} is not one {self.backend} runs "
                             f"({', '.join(BACKEND_PRECISIONS[self.backend])})")
        object.__setattr__(self, "input_size", hw_pair("input_size", self.input_size))
        h, w = self.input_size
        if max(h, w) > MAX_SIDE:
            raise ValueError(f"input_size {h}x{w}: each side must be at most {MAX_SIDE}")
        number("threshold", self.threshold)
        if self.batch is not None and (integer("batch", self.batch) > MAX_BATCH
                                       or self.batch * h * w > MAX_BATCH_PIXELS):
            raise ValueError(f"batch {self.batch}: at most {MAX_BATCH} frames and {MAX_BATCH_PIXELS} input pixels")
        if self.scoring is not None and not isinstance(self.scoring, ScoringSpec):
            raise ValueError("scoring must be a ScoringSpec")
        if self.scoring is not None and self.scoring.size != self.input_size:
            raise ValueError(f"scoring.size {list(self.scoring.size)} differs from input_size {[h, w]}")
        if self.scoring is not None and any(sh > h or sw > w for sh, sw in self.scoring.shapes):
            raise ValueError(f"scoring.shapes {[list(s) for s in self.scoring.shapes]}: a scale's map is at most "
                             f"the input's size ({h}x{w})")
        if self.tiling is not None and not isinstance(self.tiling, TilingSpec):
            raise ValueError("tiling must be a TilingSpec")
        if self.backend in MAPS_GRAPH_BACKENDS and self.scoring is None:
            raise ValueError(f"a {self.backend} engine needs its scoring (the fusion after its graph)")
        for name in ("model_config", "checks", "built_on"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a JSON object")
        for name in ("model_threshold", "input_stats", "provenance"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), dict)):
                raise ValueError(f"{name} must be a JSON object")
        if self.provenance is not None:
            Provenance.from_dict(self.provenance)
        if self.input_stats is not None:
            InputStats.from_dict(self.input_stats)
        if not isinstance(self.created, str):
            raise ValueError("created must be a string")

    def to_dict(self) -> dict:
        return {**asdict(self), "input_size": list(self.input_size),
                "scoring": None if self.scoring is None else self.scoring.to_dict(),
                "tiling": None if self.tiling is None else asdict(self.tiling)}

    @classmethod
    def from_dict(cls, d: dict) -> EngineHeader:
        """The header's JSON object in the current form (without the file's own keys, format_version and sections;
        engine.format.upgrade_header brings older files to it) -> EngineHeader. Unknown keys and wrong types raise
        ValueError."""
        d = strict_kwargs(cls, d)
        missing = [k for k in ("backend", "input_size", "threshold") if k not in d]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        if isinstance(d["input_size"], int) and not isinstance(d["input_size"], bool):  # not the current form
            raise ValueError(f"input_size must be a [height, width] pair, not {d['input_size']!r}")
        scoring, tiling = d.get("scoring"), d.get("tiling")
        return cls(**{**d, "scoring": None if scoring is None else ScoringSpec.from_dict(scoring),
                      "tiling": None if tiling is None else TilingSpec.from_dict(tiling)})

    @property
    def needed_sections(self) -> tuple[str, ...]:
        if self.backend == "torch" and self.scoring is None:  # before format 8: the PyTorch reference alone
            return (SECTION_MODEL,)
        return required_sections(self.backend, self.precision)
