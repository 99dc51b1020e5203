import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter here: correctness only, no speed
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the real-data checks' MTD; LINEFLOW_MTD points elsewhere (the GPU machine gets a few images carried with the tree)
MTD = Path(os.environ.get("LINEFLOW_MTD") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A tiny generated MVTec-layout set (64 px; 8 train, 3 good and 2 per defect type per texture)."""
    from train.demo_data import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, size=64, n_train=8,
                             n_test_good=3, n_test_defect=2)


class CodePickle:
    """Unpickling this opens (creates) `target`: stands in for a model or engine file that carries code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def conv_gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The map blur written out as a convolution (gaussian_taps, reflect padding): the tests' reference for the
    blur matrices that train.maps.gaussian_blur and every engine apply."""
    import torch.nn.functional as F

    from engine.common.maths import gaussian_taps
    for dim, n in ((-1, x.shape[-1]), (-2, x.shape[-2])):
        taps = gaussian_taps(sigma, n)
        if taps is None:
            continue
        k = torch.from_numpy(taps).to(x)
        radius = (k.numel() - 1) // 2
        pad, shape = ((radius, radius, 0, 0), (1, 1, 1, -1)) if dim == -1 else ((0, 0, radius, radius), (1, 1, -1, 1))
        x = F.conv2d(F.pad(x[:, None], pad, mode="reflect"), k.view(shape))[:, 0]
    return x
