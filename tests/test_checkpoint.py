"""model.pt is tensors-only, versioned and checksummed; damaged or unsafe files are refused."""

import pytest
import torch
from conftest import CodePickle

from train.checkpoint import FORMAT_VERSION, ModelFileError, load_model, save_model
from train.model import FastFlow, FlowConfig


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=2))
    with torch.no_grad():
        model.bases[0].mean.add_(0.5)
    path = tmp_path / "m.pt"
    save_model(path, model, {"threshold": {"threshold": 0.4}})
    return path, model


def test_roundtrip_and_weights_only(model_file):
    path, model = model_file
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["format_version"] == FORMAT_VERSION
    loaded, meta = load_model(path)
    assert meta.threshold.threshold == 0.4
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_tampered_tensor_is_refused(model_file):
    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["bases.0.mean"][3] += 1e-3
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_other_format_version_is_refused(model_file):
    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    payload["meta"]["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=f"version {FORMAT_VERSION + 1}"):
        load_model(path)


def test_truncated_and_foreign_files_are_refused(model_file, tmp_path):
    path, _ = model_file
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="m.pt"):
        load_model(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not a lineflow model"):
        load_model(other)


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"meta": {"format": "lineflow-model"}, "x": CodePickle(str(marker))}, path)
    with pytest.raises(ModelFileError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_config_with_a_missing_key_is_refused(model_file):
    """A default must not silently stand in for a setting the weights were trained with."""
    from train.checkpoint import checksum

    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    del payload["meta"]["config"]["feature_pool"]
    payload["checksum"] = checksum(payload["meta"], payload["state_dict"])
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="missing keys.*feature_pool"):
        load_model(path)


def test_model_file_before_blur_mode_loads_with_one_sigma_for_every_scale(model_file):
    """model.pt of before per-scale blur had one blur for the whole map: it loads as that ("fixed"), not as
    today's default (half a cell at each scale)."""
    from train.checkpoint import checksum

    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    assert payload["meta"]["config"].pop("blur_mode") == "stride"
    payload["meta"]["format_version"] = 1  # what every file before version 6 wrote
    payload["meta"]["config"]["blur_sigma"] = 4.0
    payload["checksum"] = checksum(payload["meta"], payload["state_dict"])
    torch.save(payload, path)
    model, _ = load_model(path)
    assert model.config.blur_mode == "fixed" and model.scale_sigmas() == [4.0] * 4


def test_model_file_before_pool_scales_loads_with_every_scale_averaged(model_file):
    """model.pt of before per-scale pooling was trained on every scale averaged: it loads as that, not as today's
    default (which averages only the coarse scales)."""
    from train.checkpoint import checksum

    path, _ = model_file
    payload = torch.load(path, weights_only=True)
    assert payload["meta"]["config"].pop("pool_scales") == "coarse"
    payload["meta"]["format_version"] = 1  # what every file before version 6 wrote
    payload["checksum"] = checksum(payload["meta"], payload["state_dict"])
    torch.save(payload, path)
    model, _ = load_model(path)
    assert model.config.pool_scales == "all" and all(model.pooled_scales())
