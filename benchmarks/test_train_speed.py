"""The flow's training step on the CPU, same run: the channel permutation's backward, and one whole step.

    python -m pytest benchmarks/test_train_speed.py --benchmark-columns=median,iqr,rounds

Each coupling step ends in FastFlow's fixed random channel permutation. Written as `x[:, perm]`, torch's backward
is an accumulating index_put_ (serial on the CPU); `PermuteChannels` (train/model.py) gathers the gradient by the
inverse permutation instead: the same numbers, bit for bit (tests/test_flow.py checks the gradient). Shapes: the
default BSD model's four scales (544x224 input, a batch of 16, as `train.fit` trains it). The whole step (flow
forward, backward, optimiser) is timed for the record beside them. benchmarks/NOTES.md has the table.
"""

import pytest
import torch

from train.fit import TrainConfig, make_optimisers, train_step
from train.model import FastFlow, FlowConfig, PermuteChannels

INPUT_HW, BATCH, ROUNDS = (224, 544), 16, 20
VARIANTS = {"index (torch's backward)": lambda x, perm, inv: x[:, perm],
            "inverse gather (PermuteChannels)": PermuteChannels.apply}


@pytest.fixture(scope="module")
def model() -> FastFlow:
    torch.manual_seed(0)
    return FastFlow(FlowConfig(input_size=INPUT_HW))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scale", range(4))
def test_permutation_forward_backward(benchmark, model, scale, variant):
    channels, stride = model.backbone.channels[scale], model.backbone.strides[scale]
    shape = (BATCH, channels, INPUT_HW[0] // stride, INPUT_HW[1] // stride)
    benchmark.group = f"channel permutation, forward + backward | {'x'.join(map(str, shape))}"
    perm = torch.randperm(channels, generator=torch.Generator().manual_seed(0))
    inv, permute = torch.argsort(perm), VARIANTS[variant]
    x, grad = torch.randn(shape, requires_grad=True), torch.randn(shape)

    def run():
        x.grad = None
        permute(x, perm, inv).backward(grad)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    assert torch.equal(x.grad, grad[:, inv])


def test_training_step(benchmark, model):
    benchmark.group = f"training step, default flow | {INPUT_HW[1]}x{INPUT_HW[0]}, batch {BATCH}"
    with torch.no_grad():
        feats = [torch.randn_like(f) for f in model.backbone(torch.rand(BATCH, 3, *INPUT_HW))]
    cfg = TrainConfig()
    flow_opt, base_opt = make_optimisers(model, cfg)
    steps = iter(range(10 ** 6))
    benchmark.pedantic(lambda: train_step(model, feats, next(steps), flow_opt, base_opt, cfg), rounds=5,
                       warmup_rounds=1)
