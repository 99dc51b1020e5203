"""AltUB alternation: on the base's turn only the base moves; otherwise only the flow moves."""

import pytest
import torch

from train.fit import TrainConfig, make_optimisers, train_step
from train.model import FastFlow, FlowConfig
from train.tiles import FrameTiles


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


def _feats(model, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = zip(model.backbone.channels, model.backbone.strides)
    return [torch.randn(4, c, 64 // s, 64 // s, generator=g) * 2 + 1 for c, s in shapes]


def test_alternation_freezes_what_it_should():
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=2, altub=True))
    cfg = TrainConfig(altub_every=3)
    flow_opt, base_opt = make_optimisers(model, cfg)
    for step in range(7):
        flow_before, base_before = _snapshot(model.flow_parameters()), _snapshot(model.base_parameters())
        train_step(model, _feats(model, step), step, flow_opt, base_opt, cfg)
        flow_moved = _changed(flow_before, model.flow_parameters())
        base_moved = _changed(base_before, model.base_parameters())
        if (step + 1) % 3 == 0:  # the base's turn
            assert all(base_moved) and not any(flow_moved), step
        else:
            assert not any(base_moved) and any(flow_moved), step
    # the backbone never moves
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_no_altub_keeps_the_base_fixed_at_standard_normal():
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=2, altub=False))
    cfg = TrainConfig(altub_every=2)
    flow_opt, base_opt = make_optimisers(model, cfg)
    assert base_opt is None
    for step in range(4):
        train_step(model, _feats(model, step), step, flow_opt, base_opt, cfg)
    for p in model.base_parameters():
        assert not p.requires_grad and torch.equal(p, torch.zeros_like(p))


def test_base_gradients_do_not_accumulate_across_flow_turns():
    """The base's step must use the gradient of its own batch only, not a sum over the flow's turns."""
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=1, altub=True))
    cfg = TrainConfig(altub_every=2)
    flow_opt, base_opt = make_optimisers(model, cfg)
    train_step(model, _feats(model, 0), 0, flow_opt, base_opt, cfg)  # flow's turn
    feats = _feats(model, 1)
    zs, logdet = model.flow(feats)
    expected = torch.autograd.grad(model.nll_per_dim(zs, logdet).mean(), model.base_parameters())
    captured = []
    base_opt.step = lambda: captured.extend(p.grad.clone() for p in model.base_parameters())  # type: ignore[method-assign]
    train_step(model, feats, 1, flow_opt, base_opt, cfg)  # base's turn
    for got, want in zip(captured, expected):
        assert torch.allclose(got, want, atol=1e-6)
    assert all(p.grad is None for p in model.flow_parameters())  # the flow's backward was not run on the base's turn


def test_calibrated_scales_put_held_out_pixels_in_common_units():
    """After calibration each scale's held-out pixel NLL has median 0 and 99th percentile 1 in map units."""
    import numpy as np

    from train.fit import calibrate_scales

    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=1)).eval()
    feats = _feats(model, 7)
    zs, _ = model.flow(feats)
    calibrate_scales(model, ([z[:3] for z in zs], [z[3:] for z in zs]))  # in two batches, as the held-out frames come
    for nll, (median, q99) in zip(model.pixel_nll(zs), model.scale_stats):
        units = ((nll - median) / (q99 - median)).detach().numpy().ravel()
        assert abs(np.median(units)) < 1e-5 and abs(np.quantile(units, 0.99) - 1) < 1e-5


def test_cosine_schedule_decays_both_learning_rates_to_zero(monkeypatch):
    """--lr-schedule cosine: step 0 at the configured rates, then down to ~0 at the last step, flow and base alike."""
    import train.fit as fit_mod

    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=1, altub=True))
    cfg = TrainConfig(epochs=3, batch_size=2, lr=1e-3, base_lr=1e-2, altub_every=2, lr_schedule="cosine")
    seen = []
    real_step = fit_mod.train_step

    def recording_step(model, feats, step, flow_opt, base_opt, cfg):
        seen.append((flow_opt.param_groups[0]["lr"], base_opt.param_groups[0]["lr"]))
        return real_step(model, feats, step, flow_opt, base_opt, cfg)

    monkeypatch.setattr(fit_mod, "train_step", recording_step)
    held_out = [FrameTiles((64, 64), ((0, 0),))] * 4  # 4 images, each one whole tile
    fit_mod.fit(model, _feats(model, 1), _feats(model, 2), held_out, cfg, torch.device("cpu"))
    assert len(seen) == 6  # 3 epochs x 2 batches of 2
    assert seen[0] == (1e-3, 1e-2)
    flow_lrs = [f for f, _ in seen]
    assert all(a > b for a, b in zip(flow_lrs, flow_lrs[1:]))
    assert seen[-1][0] < 0.1 * 1e-3 and abs(seen[-1][1] / seen[-1][0] - 10) < 1e-9


def test_anneal_schedule_holds_then_decays_over_the_last_fifth():
    from train.schedule import schedule_factor

    total = 100
    assert [schedule_factor("constant", s, total) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert all(schedule_factor("anneal", s, total) == 1.0 for s in range(80))
    tail = [schedule_factor("anneal", s, total) for s in range(80, total)]
    assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < 0.01
    assert abs(schedule_factor("anneal", 90, total) - 0.5) < 1e-12  # halfway through the decay
    assert abs(schedule_factor("cosine", 50, total) - 0.5) < 1e-12
    with pytest.raises(ValueError, match="lr_schedule"):
        schedule_factor("linear", 0, total)



@pytest.mark.parametrize("weights", [None, torch.tensor([8.0, 1.0, 1.0, 1.0], dtype=torch.float64)])
def test_draw_weights_set_how_often_an_epoch_draws_each_tile(monkeypatch, weights):
    """fit(weights=None): every tile once an epoch; with weights: as many draws, tile 0 the most often."""
    import train.fit as fit_mod

    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=1, altub=True))
    train = _feats(model, 1)
    drawn = []

    def recording_step(model, feats, step, flow_opt, base_opt, cfg):
        for f in feats[0]:  # which training tile each row is
            drawn.append(next(i for i in range(4) if torch.equal(f, train[0][i])))
        return 0.0

    monkeypatch.setattr(fit_mod, "train_step", recording_step)
    held_out = [FrameTiles((64, 64), ((0, 0),))] * 4
    cfg = TrainConfig(epochs=25, batch_size=2, early_stop=False)  # the stubbed step never trains: it would plateau
    fit_mod.fit(model, train, _feats(model, 2), held_out, cfg, torch.device("cpu"), weights=weights)
    counts = torch.bincount(torch.tensor(drawn), minlength=4)
    assert counts.sum() == 100  # 25 epochs x 4 draws
    if weights is None:
        assert counts.tolist() == [25, 25, 25, 25]
    else:  # 8/11 of the draws expected on tile 0: 73 of 100
        assert counts[0] > 55 and all(counts[1:] < 20)
