"""The flow's training step on the CPU, same run: the channel permutation's backward, and one whole step.

    python -m pytest benchmarks/test_train_speed.py --benchmark-columns=median,iqr,rounds

Each coupling step ends in FastFlow's fixed random channel permutation. Written as `x[:, perm]`, torch's backward
is an accumulating index_put_ (serial on the CPU); `PermuteChannels` (train/model.py) gathers the gradient by the
inverse permutation instead: the same numbers, bit for bit (tests/test_flow.py checks the gradient). Shapes: the
BSD model's four scales at 544x224 (its default input until 2026-12-04; 640x256 since), a batch of 16, as `train.fit`
trains it. The whole step (flow forward, backward, optimiser) is timed for the record beside them, and the base's turn
of AltUB (every 5th step) with and without autograd through the flow. benchmarks/NOTES.md has the tables.

Training steps per second, train.fit's default on this machine (train.schedule: the fastest precision, bf16 autocast
on a CPU with AMX-BF16 or AVX512-BF16, else fp32; the fused step) against `--train-precision fp32` (the reference:
fp32, eager) and against the default precision with `--train-step eager`, at both data sets' default inputs (BSD
640x256, MTD 256x256), batch 16, AltUB's cadence (every 5th step the base's), same run:

    python -m pytest benchmarks/test_train_speed.py -k precision --benchmark-columns=median,iqr,rounds

The coupling's element-wise tail alone, forward + backward, fused (train/fused_tail.py, one native pass each way)
against the eager PyTorch it replaces, at BSD's finest scale (24 channels at 64x160, batch 16; h in bf16 as autocast
gives it, and in fp32):

    python -m pytest benchmarks/test_train_speed.py -k tail --benchmark-columns=median,iqr,rounds
"""

from functools import partial

import pytest
import torch

from train.fit import TrainConfig, make_optimisers, train_step
from train.fused_tail import coupling_tail, coupling_tail_reference
from train.model import SOFT_CLAMP_FACTOR, FastFlow, FlowConfig, PermuteChannels
from train.schedule import fastest_precision, fastest_step

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


DEFAULT_INPUTS = {"BSD 640x256": (256, 640), "MTD 256x256": (256, 256)}
STEPS_A_ROUND = 5  # one AltUB cycle: 4 flow steps and the base's


SETTINGS = ["fp32 (--train-precision fp32)", "default precision, --train-step eager", "default"]


@pytest.mark.parametrize("precision", SETTINGS)
@pytest.mark.parametrize("data", list(DEFAULT_INPUTS))
def test_training_steps_by_precision(benchmark, data, precision):
    hw, cpu, fp32 = DEFAULT_INPUTS[data], torch.device("cpu"), precision == SETTINGS[0]
    chosen = "fp32" if fp32 else fastest_precision(cpu)[0]
    kind = "eager" if precision == SETTINGS[1] else fastest_step(cpu, "fp32" if fp32 else "auto")[0]
    benchmark.group = f"training steps, {STEPS_A_ROUND} a round (4 flow + 1 base) | {data}, batch {BATCH}"
    benchmark.extra_info.update(precision=chosen, step=kind)
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=hw))
    with torch.no_grad():
        feats = [torch.randn_like(f) for f in model.features(torch.rand(BATCH, 3, *hw))]
    cfg = TrainConfig(precision=chosen, step=kind)
    flow_opt, base_opt = make_optimisers(model, cfg)
    losses = []

    def run():
        for step in range(STEPS_A_ROUND):
            losses.append(train_step(model, feats, step, flow_opt, base_opt, cfg))

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["steps_per_s"] = STEPS_A_ROUND / benchmark.stats.stats.median
    assert all(torch.isfinite(torch.tensor(losses)))


TAILS = {"fused (train/fused_tail.py)": coupling_tail,
         "eager (PyTorch: CouplingStep.forward's ops, torch.atan)": partial(coupling_tail_reference, atan=torch.atan)}


@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", list(TAILS))
def test_coupling_tail_forward_backward(benchmark, variant, h_dtype):
    b, c, hw = BATCH, 24, (64, 160)  # BSD's stride-4 scale at 640x256
    benchmark.group = f"coupling tail, forward + backward | {b}x{c}x{hw[0]}x{hw[1]}, h {str(h_dtype)[6:]}"
    torch.manual_seed(0)
    x1, x2 = torch.randn(b, c // 2, *hw, requires_grad=True), torch.randn(b, c // 2, *hw, requires_grad=True)
    h = torch.randn(b, c, *hw).to(h_dtype).requires_grad_()
    g, bias = torch.zeros(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    perm = torch.randperm(c)
    order = torch.argsort(perm) if variant.startswith("fused") else perm  # the fused tail takes the inverse
    grads = [torch.randn(b, c // 2, *hw), torch.randn(b, c // 2, *hw), torch.randn(b)]

    def run():
        out = TAILS[variant](x1, x2, h, g, bias, order, 2.0, SOFT_CLAMP_FACTOR)
        torch.autograd.backward(out, grads)

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
