"""The flow's training step on the CPU, same run: the channel permutation's backward, and one whole step.

    python -m pytest benchmarks/test_train_speed.py --benchmark-columns=median,iqr,rounds

Each coupling step ends in FastFlow's fixed random channel permutation. Written as `x[:, perm]`, torch's backward
is an accumulating index_put_ (serial on the CPU); `PermuteChannels` (train/model.py) gathers the gradient by the
inverse permutation instead: the same numbers, bit for bit (tests/test_flow.py checks the gradient). Shapes: the
BSD model's four scales at 544x224 (its default input until 2026-12-04; 640x256 since), a batch of 16, as `train.fit`
trains it. The whole step (flow forward, backward, optimiser) is timed for the record beside them, and the base's turn
of AltUB (every 5th step) with and without autograd through the flow. benchmarks/NOTES.md has the tables.
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


def _base_turn_with_flow_autograd(model, feats, base_opt, cfg):
    """The base's turn as it ran before 2026-12-04: the flow's graph kept and walked back, its gradients unused."""
    zs, logdet = model.flow(feats)
    model.zero_grad(set_to_none=True)
    model.nll_per_dim(zs, logdet).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.base_parameters(), cfg.grad_clip)
    base_opt.step()


BASE_TURNS = ["flow with autograd (before)", "flow without autograd (train_step)"]


@pytest.mark.parametrize("variant", BASE_TURNS)
def test_base_turn(benchmark, model, variant):
    benchmark.group = f"AltUB base's turn | {INPUT_HW[1]}x{INPUT_HW[0]}, batch {BATCH}"
    with torch.no_grad():
        feats = [torch.randn_like(f) for f in model.backbone(torch.rand(BATCH, 3, *INPUT_HW))]
    cfg = TrainConfig()
    flow_opt, base_opt = make_optimisers(model, cfg)
    before = variant == BASE_TURNS[0]

    def run():
        if before:
            _base_turn_with_flow_autograd(model, feats, base_opt, cfg)
        else:
            train_step(model, feats, cfg.altub_every - 1, flow_opt, base_opt, cfg)  # a base's turn

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert all(p.grad is not None for p in model.base_parameters())


def test_training_step(benchmark, model):
    benchmark.group = f"training step, default flow | {INPUT_HW[1]}x{INPUT_HW[0]}, batch {BATCH}"
    with torch.no_grad():
        feats = [torch.randn_like(f) for f in model.backbone(torch.rand(BATCH, 3, *INPUT_HW))]
    cfg = TrainConfig()
    flow_opt, base_opt = make_optimisers(model, cfg)
    steps = iter(range(10 ** 6))
    benchmark.pedantic(lambda: train_step(model, feats, next(steps), flow_opt, base_opt, cfg), rounds=5,
                       warmup_rounds=1)
