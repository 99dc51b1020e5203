"""Files of every older version still read, as the current one: engine headers (engine.format.upgrade_header,
versions 2-8) and model.pt (train.checkpoint.upgrade_checkpoint, versions 3-6). Each older file is written here as
that version wrote it (the histories are in engine/format.py and train/checkpoint.py); a version older than the
oldest readable and a newer one are refused in one line."""

import hashlib
import json
import struct

import pytest
import torch

from engine.format import FORMAT_VERSION, MAGIC, OLDEST_READABLE, EngineFileError, read_engine, upgrade_header
from engine.header import SECTION_MODEL, SECTION_ONNX, EngineHeader
from engine.scoring import ScoringSpec
from train import checkpoint
from train.checkpoint import ModelFileError, ModelMeta, load_model, upgrade_checkpoint
from train.model import FastFlow, FlowConfig

# ------------------------------------------------------------------------------------------------- engines

SCORING = ScoringSpec(size=(64, 64), sigma=(4.0,) * 4, top_k=410, shapes=((16, 16), (8, 8), (4, 4), (2, 2)),
                      map_weights=(1 / 3, 1 / 3, 1 / 3, 0.0), image_weights=(0.0, 0.0, 0.5, 0.5))
CURRENT = EngineHeader(backend="onnxruntime", input_size=(64, 64), threshold=1.25, precision="fp32",
                       scoring=SCORING, model_config={"backbone": "efficientnet_lite0"},
                       model_threshold={"threshold": 1.25, "rule": "robust"}, checks={"ms_per_frame": 3.0},
                       created="2026-12-01T00:00:00+00:00", built_on={"python": "3.11.7"})


def _as_written(version: int, header: EngineHeader = CURRENT) -> dict:
    """The header's JSON object as a file of `version` wrote it."""
    raw = header.to_dict()
    if version <= 5 and raw["scoring"] is not None:  # one sigma for every scale
        raw["scoring"] = {**raw["scoring"], "sigma": raw["scoring"]["sigma"][0]}
    if version <= 3:  # square inputs as ints, scoring's sides as heights, no tiling
        del raw["tiling"]
        raw["input_size"] = raw["input_size"][0]
        if raw["scoring"] is None:
            del raw["scoring"]  # torch and TensorRT engines wrote none
        else:
            shapes = raw["scoring"].pop("shapes")
            raw["scoring"] = {**raw["scoring"], "size": raw["scoring"]["size"][0], "heights": [h for h, _ in shapes]}
    return raw


def _engine_file(path, raw: dict, version: int, sections: dict[str, bytes]) -> None:
    """An engine file laid out as engine/format.py lays it out, with this header object and version."""
    table, offset = [], 0
    for name, data in sections.items():
        table.append({"name": name, "offset": offset, "length": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        offset += len(data)
    head = json.dumps({**raw, "format_version": version, "sections": table}, sort_keys=True).encode()
    body = MAGIC + struct.pack("<IQ", version, len(head)) + head + b"".join(sections.values())
    path.write_bytes(body + hashlib.sha256(body).digest())


@pytest.mark.parametrize("version", range(OLDEST_READABLE, FORMAT_VERSION + 1))
def test_engine_header_of_every_readable_version_reads_as_the_current_one(version, tmp_path):
    assert EngineHeader.from_dict(upgrade_header(_as_written(version), version)) == CURRENT
    path = tmp_path / f"v{version}.engine"
    _engine_file(path, _as_written(version), version, {SECTION_ONNX: b"graph"})
    header, sections = read_engine(path)
    assert header == CURRENT and sections == {SECTION_ONNX: b"graph"}


@pytest.mark.parametrize("version", range(OLDEST_READABLE, FORMAT_VERSION))
def test_torch_engine_before_format_8_reads_without_scoring_or_kernels(version, tmp_path):
    """Torch engines of 2-7 carried the model alone: they read as that (the PyTorch reference on a CPU; the CUDA path
    asks for a rebuild, tests/test_cuda_sections.py)."""
    from dataclasses import replace
    old = replace(CURRENT, backend="torch", scoring=None)
    path = tmp_path / "torch.engine"
    _engine_file(path, _as_written(version, old), version, {SECTION_MODEL: b"model.pt"})
    header, _ = read_engine(path)
    assert header == old and header.needed_sections == (SECTION_MODEL,)


def test_tensorrt_engine_ending_at_the_image_score_is_refused_in_one_line(tmp_path):
    """Early format-4 TensorRT plans ended at (map, score), without a scoring: no longer run, rebuild."""
    from dataclasses import replace
    raw = _as_written(4, replace(CURRENT, backend="tensorrt"))
    raw["scoring"] = None
    path = tmp_path / "trt.engine"
    _engine_file(path, raw, 4, {"tensorrt_plan": b"plan"})
    with pytest.raises(EngineFileError, match="ends at the image score") as info:
        read_engine(path)
    assert "rebuild" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("version,says", [(OLDEST_READABLE - 1, "rebuild it"), (FORMAT_VERSION + 1, "newer lineflow")])
def test_engine_older_than_the_oldest_readable_or_newer_is_refused_in_one_line(version, says, tmp_path):
    path = tmp_path / "e.engine"
    _engine_file(path, _as_written(OLDEST_READABLE), version, {SECTION_ONNX: b"graph"})
    with pytest.raises(EngineFileError, match=f"version {version}") as info:
        read_engine(path)
    assert says in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_current_header_is_read_in_its_current_form_only():
    """The schema reads the current form: what older versions wrote passes through upgrade_header first."""
    with pytest.raises(ValueError, match="input_size"):
        EngineHeader.from_dict({**CURRENT.to_dict(), "input_size": 64})
    with pytest.raises(ValueError, match="sigma"):
        ScoringSpec.from_dict({**SCORING.to_dict(), "sigma": 4.0})
    with pytest.raises(ValueError, match="heights"):
        ScoringSpec.from_dict(_as_written(3)["scoring"])


# ------------------------------------------------------------------------------------------------- model.pt

# the values the settings each version lacked meant then: whole frames, every scale averaged, one blur sigma
CONFIG = FlowConfig(backbone="efficientnet_lite0", input_size=(64, 64), flow_steps=2, tile_scale=0.0,
                    tile_overlap=0.25, pool_scales="all", blur_mode="fixed")
THRESHOLD_V3 = {"threshold": 1.2, "quantile": 0.99, "n_images": 3, "score_min": 0.5, "score_median": 0.7,
                "score_max": 1.3}
THRESHOLD_V4 = {"threshold": 1.1, "rule": "robust", "spreads": 4.0, "robust_std": 0.1, "n_images": 3,
                "score_min": 0.5, "score_median": 0.7, "score_max": 1.3, "holdout_scores": [0.5, 0.7, 1.3]}
RECORD = {"train_config": {"epochs": 2, "seed": 0}, "epoch": 2, "history": [{"epoch": 1, "train_loss": 1.0}],
          "data": {"root": "/data/mtd", "n_train": 40, "n_holdout": 3}, "timing": {"features_s": 1.0, "total_s": 9.0}}


def _meta_as_written(version: int) -> dict:
    """model.pt's metadata as a file of `version` wrote it (every one before 6 wrote format_version 1)."""
    config = CONFIG.to_dict()
    for v, key in ((2, "feature_pool"), (2, "fusion"), (2, "image_score_top"), (3, "map_scales"),
                   (3, "image_scales"), (4, "tile_scale"), (4, "tile_overlap"), (5, "pool_scales"), (6, "blur_mode")):
        if version < v:
            del config[key]
    if version < 4:
        config["input_size"] = 64
    return {"format": checkpoint.FORMAT, "format_version": 1 if version < 6 else version, "config": config,
            "threshold": THRESHOLD_V3 if version < 4 else THRESHOLD_V4, **RECORD}


def _model_file(path, version: int) -> FastFlow:
    torch.manual_seed(0)
    model = FastFlow(CONFIG)
    meta, state = _meta_as_written(version), {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"meta": meta, "state_dict": state, "checksum": checkpoint.checksum(meta, state)}, path)
    return model


@pytest.mark.parametrize("version", range(checkpoint.OLDEST_READABLE, checkpoint.FORMAT_VERSION + 1))
def test_model_file_of_every_readable_version_reads_as_the_current_one(version, tmp_path):
    assert checkpoint.written_version(_meta_as_written(version)) == version
    current = upgrade_checkpoint(_meta_as_written(version), version)
    assert current["format_version"] == checkpoint.FORMAT_VERSION and FlowConfig.from_dict(current["config"]) == CONFIG
    path = tmp_path / f"v{version}.pt"
    written = _model_file(path, version)
    model, meta = load_model(path)
    assert model.config == CONFIG and model.scale_sigmas() == [2.0] * 4 and all(model.pooled_scales())
    assert all(torch.equal(a, b) for a, b in zip(written.state_dict().values(), model.state_dict().values()))
    threshold = {**THRESHOLD_V3, "rule": "quantile"} if version < 4 else THRESHOLD_V4  # version 3: the quantile
    assert meta == ModelMeta.from_dict({**RECORD, "threshold": threshold})
    assert meta.to_dict() == {**RECORD, "threshold": threshold}


@pytest.mark.parametrize("version,says", [(checkpoint.OLDEST_READABLE - 1, "retrain it"),
                                          (checkpoint.FORMAT_VERSION + 1, "newer lineflow")])
def test_model_file_older_than_the_oldest_readable_or_newer_is_refused_in_one_line(version, says, tmp_path):
    path = tmp_path / "m.pt"
    _model_file(path, checkpoint.FORMAT_VERSION)
    payload = torch.load(path, weights_only=True)
    payload["meta"] = _meta_as_written(version) if version < checkpoint.OLDEST_READABLE else \
        {**payload["meta"], "format_version": version}
    payload["checksum"] = checkpoint.checksum(payload["meta"], payload["state_dict"])
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=f"version {version}") as info:
        load_model(path)
    assert says in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_model_metadata_is_typed_and_strict(tmp_path):
    """load_model's metadata is a ModelMeta; an unknown key or a wrong type in it is refused in one line."""
    meta = ModelMeta.from_dict({**RECORD, "threshold": THRESHOLD_V4})
    assert meta.threshold.holdout_scores == [0.5, 0.7, 1.3] and meta.data.n_holdout == 3
    with pytest.raises(ValueError, match="unknown keys"):
        ModelMeta.from_dict({**RECORD, "thresholds": THRESHOLD_V4})
    with pytest.raises(ValueError, match="threshold.n_images"):
        ModelMeta.from_dict({"threshold": {**THRESHOLD_V4, "n_images": "three"}})
    path = tmp_path / "m.pt"
    _model_file(path, checkpoint.FORMAT_VERSION)
    payload = torch.load(path, weights_only=True)
    payload["meta"]["threshold"] = {**THRESHOLD_V4, "margin": 0.1}
    payload["checksum"] = checkpoint.checksum(payload["meta"], payload["state_dict"])
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="unknown keys") as info:
        load_model(path)
    assert "\n" not in str(info.value)
