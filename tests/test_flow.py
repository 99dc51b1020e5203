"""The flow is exactly invertible and its log|det J| is the true one."""

import pytest
import torch
from torch.autograd.functional import jacobian

from train.model import CouplingStep, FastFlow, FeatureNorm, FlowConfig, soft_clamp


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Trained-looking weights: the zero-initialised last convs would make every step an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("channels,kernel", [(5, 3), (8, 1), (24, 3)])
def test_coupling_step_inverts(channels, kernel):
    torch.manual_seed(0)
    step = CouplingStep(channels, kernel, hidden_ratio=1.0, clamp=2.0, seed=3).double()
    _randomise(step)
    x = torch.randn(2, channels, 7, 9, dtype=torch.float64)
    y, _ = step(x)
    assert not torch.allclose(y, x)
    assert (step.inverse(y) - x).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,weight_scale,tol", [(torch.float64, 0.3, 1e-5), (torch.float32, 0.05, 1e-5)])
def test_whole_flow_inverts(dtype, weight_scale, tol):
    """All scales, all steps; flow_inverse recovers the LayerNorm output (the norm's affine is undone)."""
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=4)).to(dtype)
    _randomise(torch.nn.ModuleList([model.norms, model.flows]), scale=weight_scale)
    feats = [torch.randn(2, c, 64 // s, 64 // s, dtype=dtype)
             for c, s in zip(model.backbone.channels, model.backbone.strides)]
    zs, _ = model.flow(feats)
    for z, back, f in zip(zs, model.flow_inverse(zs), feats):
        assert (z - f).abs().max() > 0.1  # the flow did transform
        # relative to |z|: recovering x2 subtracts t, and t grows as large as z does
        assert (back - torch.nn.functional.layer_norm(f, f.shape[1:])).abs().max() < tol * max(1.0, z.abs().max())


@pytest.mark.parametrize("kernel", [1, 3])
def test_coupling_logdet_equals_autograd_jacobian(kernel):
    torch.manual_seed(1)
    step = CouplingStep(3, kernel, hidden_ratio=2.0, clamp=2.0, seed=0).double()
    _randomise(step, seed=1)
    shape = (1, 3, 3, 2)  # 18 dimensions: the full Jacobian is 18x18
    x = torch.randn(*shape, dtype=torch.float64)
    _, logdet = step(x)
    jac = jacobian(lambda v: step(v.view(shape))[0].reshape(-1), x.reshape(-1))
    _, ref = torch.linalg.slogdet(jac)
    assert abs(logdet.item() - ref.item()) < 1e-8


@pytest.mark.parametrize("kernel", [1, 3])
def test_coupling_step_gradients_match_finite_differences(kernel):
    """The step's own backward (the permutation's inverse gather) against finite differences, for the input and
    for parameters on either side of the permutation; the log|det| test above cannot see a permuted gradient."""
    step = CouplingStep(5, kernel, hidden_ratio=1.0, clamp=2.0, seed=3).double()
    _randomise(step, seed=4)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    names = ("global_bias", "global_log_scale", "subnet.2.bias")
    params = tuple(dict(step.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def output(x, *values):  # (y, log|det J|)
        return torch.func.functional_call(step, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(output, (x, *params))


def test_norm_affine_logdet_equals_autograd_jacobian():
    """FeatureNorm's learned affine is counted (the LayerNorm before it is a fixed preprocessing)."""
    norm = FeatureNorm(3).double()
    _randomise(norm, seed=2)
    shape = (1, 3, 2, 2)
    x = torch.nn.functional.layer_norm(torch.randn(*shape, dtype=torch.float64), shape[1:])
    _, logdet = norm(x)
    affine = lambda v: v.view(shape) * norm.log_scale.exp().view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)  # noqa: E731
    jac = jacobian(lambda v: affine(v).reshape(-1), x.reshape(-1))
    assert abs(logdet.item() - torch.linalg.slogdet(jac)[1].item()) < 1e-10


def test_soft_clamp_bounded_and_near_identity_at_zero():
    s = torch.linspace(-1000, 1000, 10001)
    c = soft_clamp(s, 2.0)
    assert c.abs().max() < 2.0
    assert torch.allclose(soft_clamp(torch.tensor([1e-3]), 2.0), torch.tensor([0.636e-3]), rtol=1e-3)


def test_anomaly_map_higher_where_z_is_unlikely():
    model = FastFlow(FlowConfig(input_size=64, flow_steps=2, blur_sigma=0))
    zs = [torch.zeros(1, c, 64 // s, 64 // s) for c, s in zip(model.backbone.channels, model.backbone.strides)]
    zs[0][0, :, 5, 5] = 4.0  # one far-out feature vector at stride 4 -> pixels 20..23
    amap = model.anomaly_map(zs, (64, 64))
    assert amap.shape == (1, 64, 64)
    assert amap[0, 22, 22] > 0.2 and amap[0, 50, 50] < 1e-6


def test_image_score_top_fraction_and_max():
    amap = torch.arange(100.0).view(1, 10, 10)
    top = FastFlow(FlowConfig(input_size=64, flow_steps=1, image_score_top=0.05))
    assert top.image_score(amap).item() == (99 + 98 + 97 + 96 + 95) / 5
    assert FastFlow(FlowConfig(input_size=64, flow_steps=1, image_score_top=0)).image_score(amap).item() == 99


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="fusion"):
        FlowConfig(fusion="median")
