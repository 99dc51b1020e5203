"""model.pt: tensors and plain containers only, a format version and a checksum over everything.

Loaded with `torch.load(weights_only=True)`, so a file carrying pickled code is refused, never run.
The checksum (SHA-256 over the metadata as canonical JSON and every tensor's bytes) catches a
flipped byte in a tensor that would otherwise load silently. A file of an older version is brought
to the current schema by `upgrade_checkpoint`, one step a version; the metadata then reads as a typed
ModelMeta (train.fit's record of how the model was trained and where its threshold came from).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO

import torch

from engine.common.errors import UserError
from engine.common.files import atomic_write
from engine.common.frame_stats import InputStats
from engine.common.schema import strict_kwargs
from train.model import FastFlow, FlowConfig

__all__ = ["FORMAT", "FORMAT_VERSION", "OLDEST_READABLE", "ModelFileError", "ModelMeta", "Threshold", "DataInfo",
           "Resume", "save_model", "load_model", "load_model_bytes", "upgrade_checkpoint", "written_version",
           "checksum"]

FORMAT = "lineflow-model"
# The versions of model.pt's metadata, and what each changed (every file before version 6 wrote format_version 1;
# written_version tells them apart by their config's keys):
#   1 (2026-11-24) config {backbone, input_size: int, flow_steps, hidden_ratio, clamp, altub, blur_sigma}
#   2 (2026-11-24) + feature_pool, fusion, image_score_top
#   3 (2026-11-25) + map_scales, image_scales. 1 and 2 are not readable: a missing setting is refused since
#     2026-11-24 rather than filled in (a default could change what the weights mean): retrain them
#   4 (2026-12-02) input_size [height, width] (an int N: N x N before); + tile_scale, tile_overlap (0: whole frames);
#     the threshold records its rule (only the quantile before) and its held-out scores
#   5 (2026-12-03) + pool_scales ("all": every scale was averaged before)
#   6 (2026-12-03) + blur_mode ("fixed": one sigma for the whole map before); written as 6 from 2026-12-06
#   7 (2026-12-06) + input_stats (the training frames' statistics, engine.common.frame_stats: drift alarms); an
#     older file has none (None: the engines built from it watch their scores only)
#   8 (2026-12-06) + resumed (train.fit --resume's record of each relearning: the parent model's SHA-256, the good
#     frames added, the run; train/resume.py); an older file has none (never resumed)
FORMAT_VERSION = 8
OLDEST_READABLE = 3
# the key each version added to the config: a file that wrote format_version 1 is the version before the first it lacks
_ADDED_BY = {2: "feature_pool", 3: "map_scales", 4: "tile_scale", 5: "pool_scales", 6: "blur_mode"}


class ModelFileError(UserError):
    """model.pt is missing, damaged, from another format version or not a lineflow model."""


def _number(name: str, v, kind=(int, float)) -> None:
    """v is None or a number of `kind` (not a bool). Not-finite floats pass: train.fit refuses those itself."""
    if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {v!r}")


def _numbers(name: str, v) -> None:
    if v is not None:
        if not isinstance(v, list):
            raise ValueError(f"{name} must be a list of numbers")
        for x in v:
            _number(name, x)


def _dropped_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class Threshold:
    """The decision threshold and how train.fit set it (train/threshold.py from_good / from_defects): the rule, its
    parameters, a summary of the held-out good images' scores and those scores themselves."""

    threshold: float
    rule: str | None = None  # "robust", "quantile" or "defects"; None: not recorded (a threshold set by hand)
    spreads: float | None = None  # robust: median + spreads x robust std
    robust_std: float | None = None
    quantile: float | None = None  # quantile: this quantile of the held-out scores
    n_images: int | None = None  # held-out good images
    score_min: float | None = None
    score_median: float | None = None
    score_max: float | None = None
    holdout_scores: list[float] | None = None  # the held-out good images' scores (engines carry them: drift checks)
    n_defect_images: int | None = None  # defects: the user's defect images it separated from the good ones
    defects_caught: float | None = None
    good_rejected: float | None = None
    defect_scores: list[float] | None = None
    robust_threshold: float | None = None  # defects: what the label-free rule would have set
    quantile_threshold: float | None = None

    def __post_init__(self):
        if self.rule not in (None, "robust", "quantile", "defects"):
            raise ValueError(f"threshold rule must be robust, quantile or defects, not {self.rule!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("holdout_scores", "defect_scores"):
                _numbers(f"threshold.{f.name}", v)
            elif f.name in ("n_images", "n_defect_images"):
                _number(f"threshold.{f.name}", v, int)
            elif f.name != "rule":
                _number(f"threshold.{f.name}", v)
        if self.threshold is None:
            raise ValueError("threshold.threshold must be a number")

    @classmethod
    def from_dict(cls, d: dict) -> Threshold:
        return cls(**strict_kwargs(cls, d, "threshold"))

    def to_dict(self) -> dict:
        return _dropped_none(asdict(self))


@dataclass(frozen=True)
class DataInfo:
    """Where the model was trained: the folder and how many images went to the fit and to the held-out set."""

    root: str
    n_train: int
    n_holdout: int

    def __post_init__(self):
        if not isinstance(self.root, str):
            raise ValueError("data.root must be a string")
        _number("data.n_train", self.n_train, int)
        _number("data.n_holdout", self.n_holdout, int)

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        try:
            return cls(**strict_kwargs(cls, d, "data"))
        except TypeError as e:
            raise ValueError(f"data: {e}") from None


@dataclass(frozen=True)
class Resume:
    """One `train.fit --resume` (train/resume.py): the model it continued, the good frames it added, its run."""

    parent_sha256: str  # of the parent model file, as sha256sum prints it
    added: str  # the folder of new good frames (a later --resume reads them again: they are part of the training)
    n_added: int
    n_added_holdout: int  # of those, held out with the parent's held-out frames (they set the threshold)
    epochs: int
    parent_threshold: float | None = None
    train_config: dict | None = None  # the resumed run's TrainConfig
    seconds: float | None = None

    def __post_init__(self):
        if not (isinstance(self.parent_sha256, str) and len(self.parent_sha256) == 64
                and all(c in "0123456789abcdef" for c in self.parent_sha256)):
            raise ValueError("resumed.parent_sha256 must be 64 lowercase hex digits")
        if not isinstance(self.added, str):
            raise ValueError("resumed.added must be a string")
        for name in ("n_added", "n_added_holdout", "epochs"):
            _number(f"resumed.{name}", getattr(self, name), int)
        _number("resumed.parent_threshold", self.parent_threshold)
        _number("resumed.seconds", self.seconds)
        if self.train_config is not None and not isinstance(self.train_config, dict):
            raise ValueError("resumed.train_config must be a dict")

    @classmethod
    def from_dict(cls, d: dict) -> Resume:
        try:
            return cls(**strict_kwargs(cls, d, "resumed"))
        except TypeError as e:
            raise ValueError(f"resumed: {e}") from None


@dataclass(frozen=True)
class ModelMeta:
    """What model.pt says besides the weights and the config: the threshold, and train.fit's record of the fit."""

    threshold: Threshold | None = None  # None: no decision threshold (engine.build refuses such a model)
    train_config: dict | None = None  # train.fit's TrainConfig, as written
    epoch: int | None = None
    history: list[dict] | None = None  # per epoch: losses, held-out NLL, ...
    data: DataInfo | None = None
    timing: dict | None = None  # seconds: feature caching, the whole fit
    input_stats: InputStats | None = None  # the training frames' statistics (train/input_stats.py); None: before 7
    resumed: list[Resume] | None = None  # each train.fit --resume that led to this model, oldest first; None: none

    def __post_init__(self):
        for name, kind in (("threshold", Threshold), ("data", DataInfo), ("train_config", dict), ("timing", dict),
                           ("input_stats", InputStats)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, kind):
                raise ValueError(f"{name} must be a {kind.__name__}, not {type(v).__name__}")
        _number("epoch", self.epoch, int)
        if self.history is not None and not (isinstance(self.history, list)
                                             and all(isinstance(row, dict) for row in self.history)):
            raise ValueError("history must be a list of dicts")
        if self.resumed is not None and not (isinstance(self.resumed, list)
                                             and all(isinstance(r, Resume) for r in self.resumed)):
            raise ValueError("resumed must be a list of Resume records")

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        """The metadata's dict (without format, format_version and config) -> ModelMeta; unknown keys and wrong types
        raise ValueError."""
        d = strict_kwargs(cls, d, "model metadata")
        threshold, data, stats, resumed = d.get("threshold"), d.get("data"), d.get("input_stats"), d.get("resumed")
        if resumed is not None and not isinstance(resumed, list):
            raise ValueError("resumed must be a list")
        return cls(**{**d, "threshold": None if threshold is None else Threshold.from_dict(threshold),
                      "data": None if data is None else DataInfo.from_dict(data),
                      "input_stats": None if stats is None else InputStats.from_dict(stats),
                      "resumed": None if resumed is None else [Resume.from_dict(r) for r in resumed]})

    def to_dict(self) -> dict:
        return _dropped_none({"threshold": None if self.threshold is None else self.threshold.to_dict(),
                              "train_config": self.train_config, "epoch": self.epoch, "history": self.history,
                              "data": None if self.data is None else asdict(self.data), "timing": self.timing,
                              "input_stats": None if self.input_stats is None else self.input_stats.to_dict(),
                              "resumed": None if self.resumed is None
                              else [_dropped_none(asdict(r)) for r in self.resumed]})


def checksum(meta: dict, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(path: str | Path, model: FastFlow, meta: ModelMeta | dict) -> None:
    """Write atomically (engine.common.files): never a partial model file. `meta`: a ModelMeta, or its dict."""
    path = Path(path)
    meta = ModelMeta.from_dict(meta) if isinstance(meta, dict) else meta
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    raw = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict(), **meta.to_dict()}
    payload = {"meta": raw, "state_dict": state, "checksum": checksum(raw, state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialised first: a full disk then fails in the write, which names the file
    torch.save(payload, buf)
    with atomic_write(path) as f:
        f.write(buf.getbuffer())


# ---------------------------------------------------------------------------------------------- older versions

def written_version(meta: dict):
    """The schema version a file's metadata is in: its format_version; files before version 6 all wrote 1, and
    are the version before the first whose config key they lack."""
    version, config = meta.get("format_version"), meta.get("config")
    if version != 1 or not isinstance(config, dict):
        return version
    return next((v - 1 for v, key in sorted(_ADDED_BY.items()) if key not in config), 6)


def _with_config(meta: dict, **added) -> dict:
    """meta with `added` config keys where its config lacks them (the values the older version meant)."""
    config = meta.get("config")
    return {**meta, "config": {**added, **config}} if isinstance(config, dict) else meta


def _to_4(meta: dict) -> dict:
    config = meta.get("config")
    if isinstance(config, dict) and isinstance(config.get("input_size"), int):
        meta = {**meta, "config": {**config, "input_size": [config["input_size"]] * 2}}
    threshold = meta.get("threshold")
    if isinstance(threshold, dict) and "rule" not in threshold and "quantile" in threshold:
        meta = {**meta, "threshold": {**threshold, "rule": "quantile"}}  # the one rule before
    return _with_config(meta, tile_scale=0.0, tile_overlap=0.25)


def _to_5(meta: dict) -> dict:
    return _with_config(meta, pool_scales="all")


def _to_6(meta: dict) -> dict:
    return _with_config(meta, blur_mode="fixed")


def _to_7(meta: dict) -> dict:
    return meta  # input_stats absent: None (not recorded)


def _to_8(meta: dict) -> dict:
    return meta  # resumed absent: None (never resumed)


_UPGRADES = {3: _to_4, 4: _to_5, 5: _to_6, 6: _to_7, 7: _to_8}  # version -> the step to the next one
assert set(_UPGRADES) == set(range(OLDEST_READABLE, FORMAT_VERSION))


def upgrade_checkpoint(meta: dict, version: int) -> dict:
    """model.pt's metadata as a file of `version` wrote it -> the current schema, one step a version (format_version
    then FORMAT_VERSION). ValueError for a version outside OLDEST_READABLE..FORMAT_VERSION."""
    if not OLDEST_READABLE <= version <= FORMAT_VERSION:
        raise ValueError(f"model format version {version} is outside {OLDEST_READABLE}-{FORMAT_VERSION}")
    for v in range(version, FORMAT_VERSION):
        meta = _UPGRADES[v](meta)
    return {**meta, "format_version": FORMAT_VERSION}


def _version_refusal(path: str, version) -> str | None:
    readable = f"this lineflow reads versions {OLDEST_READABLE}-{FORMAT_VERSION}"
    if not isinstance(version, int) or isinstance(version, bool):
        return f"{path}: model format version {version!r} is not one ({readable}); retrain it with python -m train.fit"
    if version > FORMAT_VERSION:
        return (f"{path}: model format version {version} was written by a newer lineflow; {readable}: upgrade "
                f"lineflow, or retrain with this one (python -m train.fit)")
    if version < OLDEST_READABLE:
        return f"{path}: model format version {version}; {readable}: retrain it with python -m train.fit"
    return None


# ---------------------------------------------------------------------------------------------- reading

def load_model(path: str | Path, map_location: str = "cpu") -> tuple[FastFlow, ModelMeta]:
    """model.pt -> (model in eval mode, metadata). Raises ModelFileError with what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        return load_model_bytes(f, str(path), map_location)


def load_model_bytes(file: BinaryIO, path: str, map_location: str = "cpu") -> tuple[FastFlow, ModelMeta]:
    """load_model on an open binary file (an engine carries its model.pt); `path` names it in errors."""
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types for damaged/unsafe files
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it holds Python objects other than tensors (refused unread: model files load tensors only)"
        raise ModelFileError(f"{path}: not a readable lineflow model file: {first}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), dict) \
            or payload["meta"].get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a lineflow model file (no '{FORMAT}' header)")
    raw, state = payload["meta"], payload.get("state_dict")
    version = written_version(raw)
    refusal = _version_refusal(path, version)
    if refusal:
        raise ModelFileError(refusal)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: damaged (state_dict is not a dict of tensors)")
    if checksum(raw, state) != payload.get("checksum"):
        raise ModelFileError(f"{path}: checksum mismatch: the file was modified or damaged after it was written")
    current = upgrade_checkpoint(raw, version)
    try:
        model = FastFlow(FlowConfig.from_dict(current["config"]))
        model.load_state_dict(state, strict=True)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ModelFileError(f"{path}: does not match its own config ({str(e).splitlines()[0][:160]})") from None
    try:
        meta = ModelMeta.from_dict({k: v for k, v in current.items() if k not in ("format", "format_version",
                                                                                    "config")})
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: malformed metadata ({str(e).splitlines()[0][:160]}); retrain it with "
                             "python -m train.fit") from None
    return model.eval(), meta
