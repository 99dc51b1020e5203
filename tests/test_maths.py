"""The maps' shared maths (engine.common.maths, train.maps): blur and resize matrices against PyTorch's ops
and the blur written out as a convolution."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import conv_gaussian_blur

from engine.common.maths import blur_matrix, resize_blur_matrix, resize_matrix
from engine.preprocess import frames_to_input, resize_map
from train.data import to_model_input
from train.maps import gaussian_blur


def test_shared_maths_agree_with_the_reference_model():
    """The blur written out as a convolution is the blur matrix that the reference model, the engine and the kernels
    use."""
    from conftest import conv_gaussian_blur

    from engine.common.maths import blur_matrix, resize_blur_matrix
    from train.maps import gaussian_blur
    x = torch.randn(2, 40, 40, dtype=torch.float64)
    b = torch.from_numpy(blur_matrix(40, 2.5))
    assert torch.allclose(b @ x @ b.T, conv_gaussian_blur(x, 2.5), atol=1e-12)
    assert torch.allclose(gaussian_blur(x, 2.5), conv_gaussian_blur(x, 2.5), atol=1e-12)
    q = torch.randn(2, 10, 10, dtype=torch.float64)
    up = torch.nn.functional.interpolate(q[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    r = torch.tensor(resize_blur_matrix(10, 40, 2.5))
    assert torch.allclose(r @ q @ r.T, conv_gaussian_blur(up, 2.5), atol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (64, 160)])
@pytest.mark.parametrize("hw", [(300, 120), (618, 388), (50, 70), (64, 64), (1000, 257)])
def test_numpy_resize_is_pytorchs(hw, size):
    img = np.random.default_rng(0).random((*hw, 3), dtype=np.float32)
    ref = to_model_input(img, size).numpy()
    assert np.abs(frames_to_input([img], size)[0] - ref).max() <= 1e-5
    m = np.random.default_rng(1).random(size, dtype=np.float32)  # a map at the model input's (H, W)
    # PyTorch in float64: its float32 weights are themselves up to 1.3e-5 off when upsampling 160 -> 257
    ref_map = F.interpolate(torch.from_numpy(m).double()[None, None], size=hw, mode="bilinear", align_corners=False,
                            antialias=True)[0, 0].numpy()
    assert np.abs(resize_map(m, hw) - ref_map).max() <= 1e-5
    assert resize_matrix(hw[0], 64).sum(axis=1) == pytest.approx(np.ones(64), abs=1e-5)


@pytest.mark.parametrize("n_out", [1, 37, 64, 256])
def test_resize_matrix_is_pytorchs_for_many_sizes(n_out):
    """The vectorised weights against PyTorch resizing an identity (column j = input pixel j's weights).

    1e-5: PyTorch computes the weights in float32, these in float64 (1.5e-6 apart at worst here)."""
    for n_in in [1, 2, 3, 63, 64, 65, 103, 255, 256, 257, 511, 632, 1000]:
        eye = torch.eye(n_in)[None, None]  # (1, 1, n_in, n_in): resizing rows maps input pixel j to column j
        ref = F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        assert np.abs(resize_matrix(n_in, n_out) - ref.numpy()).max() <= 1e-5, (n_in, n_out)


def test_gaussian_blur_preserves_constants_and_mass():
    x = torch.full((2, 17, 23), 0.7)
    assert torch.allclose(gaussian_blur(x, 4.0), x, atol=1e-6)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1.0
    y = gaussian_blur(spike, 2.0)
    assert abs(y.sum().item() - 1.0) < 1e-5 and y[0, 20, 20] == y.max()


@pytest.mark.parametrize("hw,sigma", [((40, 40), 2.5), ((64, 160), 4.0), ((12, 300), 16.0), ((5, 7), 0.3)])
def test_gaussian_blur_is_the_convolution(hw, sigma):
    """The blur as matrices equals it as a convolution, also where the axis truncates the taps (16 px on 12)."""
    from conftest import conv_gaussian_blur
    x = torch.randn(2, *hw, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(x, sigma), conv_gaussian_blur(x, sigma), atol=1e-12)
    x32 = x.float()
    assert (gaussian_blur(x32, sigma) - conv_gaussian_blur(x32, sigma)).abs().max() <= 1e-5


def test_resize_blur_matrix_is_upsample_then_blur():
    from conftest import conv_gaussian_blur
    q = torch.randn(2, 7, 7, dtype=torch.float64)
    r = torch.tensor(resize_blur_matrix(7, 40, 2.5))
    up = torch.nn.functional.interpolate(q[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(r @ q @ r.T, conv_gaussian_blur(up, 2.5), atol=1e-6)  # R's upsample weights are float32


def test_blur_matrix_is_gaussian_blur():
    x = torch.randn(2, 50, 50, dtype=torch.float64)
    b = torch.from_numpy(blur_matrix(50, 3.0))
    assert torch.allclose(b @ x @ b.T, conv_gaussian_blur(x, 3.0), atol=1e-12)
