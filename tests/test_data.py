"""Every input format the issue names is read; every bad input is a DataError naming the file."""

import numpy as np
import pytest
from PIL import Image

from engine.common.images import DataError, read_image
from train.data import evaluation_samples, read_mask, to_model_input, train_images


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_formats_become_rgb_float(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 7, np.uint8)], axis=2)
    g16 = (gray.astype(np.uint16) * 257)
    cases = {
        "gray.png": (_save(tmp_path / "gray.png", gray), np.repeat(gray[..., None], 3, 2) / 255),
        "rgb.png": (_save(tmp_path / "rgb.png", rgb), rgb / 255),
        "rgba.png": (_save(tmp_path / "rgba.png", rgba), rgb / 255),
        "g16.png": (_save(tmp_path / "g16.png", g16), np.repeat(gray[..., None], 3, 2) / 255),
        "rgb.bmp": (_save(tmp_path / "rgb.bmp", rgb), rgb / 255),
        "rgb.tif": (_save(tmp_path / "rgb.tif", rgb), rgb / 255),
    }
    for name, (path, want) in cases.items():
        got = read_image(path)
        assert got.shape == (10, 12, 3) and got.dtype == np.float32, name
        assert np.abs(got - want).max() < 1e-6, name
    jpg = read_image(_save(tmp_path / "x.jpg", rgb))
    assert jpg.shape == (10, 12, 3)


def test_palette_image(tmp_path):
    im = Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12)).convert("P")
    im.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (10, 12, 3)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # truncated PNG
        _save(path, np.zeros((64, 64, 3), np.uint8) + 100)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="bad.png"):
        read_image(path)


def test_model_input_is_square_and_in_range():
    x = to_model_input(np.random.default_rng(0).random((37, 91, 3), dtype=np.float32), 32)
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_mask_size_must_match_image(tmp_path):
    mask = _save(tmp_path / "m.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(DataError, match="m.png.*9x8.*10x12"):
        read_mask(mask, (12, 10), (16, 16))
    assert read_mask(mask, (8, 9), (16, 24)).shape == (16, 24)
    assert read_mask(mask, (8, 9)).shape == (8, 9)  # the mask's own resolution (evaluate's default protocol)


def test_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        train_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        train_images(tmp_path / "empty")
    (tmp_path / "mv" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/good"):
        train_images(tmp_path / "mv")
    (tmp_path / "plain").mkdir()
    _save(tmp_path / "plain" / "a.png", np.zeros((4, 4), np.uint8))
    assert [p.name for p in train_images(tmp_path / "plain")] == ["a.png"]


def test_test_samples_need_masks_and_both_classes(demo_dir, tmp_path):
    samples = evaluation_samples(demo_dir)
    assert {s.defect_type for s in samples} == {"good", "scratch", "spot", "patch"}
    assert all((s.mask_path is None) == (s.label == 0) for s in samples)
    bad = tmp_path / "nomask"
    (bad / "test" / "crack").mkdir(parents=True)
    (bad / "test" / "good").mkdir()
    _save(bad / "test" / "crack" / "001.png", np.zeros((4, 4), np.uint8))
    _save(bad / "test" / "good" / "002.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="001.png: no ground-truth mask"):
        evaluation_samples(bad)


def test_feature_extraction_restores_the_layout_when_an_image_fails(tmp_path):
    """extract_features runs the backbone channels-last; a bad image mid-way leaves it channels-first again."""
    import torch

    from train.fit import extract_features
    from train.model import FastFlow, FlowConfig

    model = FastFlow(FlowConfig(input_size=64, flow_steps=2)).eval()
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (64, 64), (120, 60, 30)).save(good)
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        extract_features(model, [good, bad], torch.device("cpu"), "features")
    assert all(p.is_contiguous() for p in model.backbone.parameters())


def test_size_weights_lift_a_rare_frame_size_only_where_sizes_are_few_and_unequal():
    from train.data import SIZE_GROUPS_MAX, size_weights

    big, small = (460, 1130), (645, 1540)
    w = size_weights([big] * 501 + [small] * 16)  # BSD's training frames
    assert np.allclose(w[:501], 501 ** -0.5) and np.allclose(w[501:], 16 ** -0.5)
    share = w[501:].sum() / w.sum()
    assert 0.14 < share < 0.16  # 3 % of the frames, 15 % of the draws
    assert size_weights([big] * 10) is None  # one size
    assert size_weights([big] * 5 + [small] * 5) is None  # sizes equally common
    many = [(100 + i, 200) for i in range(SIZE_GROUPS_MAX + 1)] + [(100, 200)]  # hand-cut tiles: sizes are not cameras
    assert size_weights(many) is None
    assert size_weights(many[:SIZE_GROUPS_MAX - 1] + [(100, 200)]) is not None
