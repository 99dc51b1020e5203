"""How long and at what precision the flow trains (train/schedule.py): early stopping on the held-out likelihood,
the anneal it plans, the precision picked for the machine, and bf16 steps against the fp32 reference."""

import math

import pytest
import torch
from conftest import MTD, mtd_model_and_features, trained_a_little

import train.fit as fit_mod
import train.schedule as schedule
from train.fit import TrainConfig, make_optimisers, train_step
from train.model import FastFlow, FlowConfig
from train.schedule import PLATEAU_EPOCHS, PLATEAU_SHARE, anneal_epochs, fastest_precision, plateau, schedule_factor
from train.tiles import FrameTiles


def test_plateau_waits_then_reads_the_gain_of_the_last_epochs():
    assert PLATEAU_EPOCHS == 3 and 0.01 < PLATEAU_SHARE < 0.09  # what the numbers below are written for
    improving = [1.0, 0.8, 0.6, 0.5, 0.45, 0.42, 0.40, 0.38, 0.36]  # the last 3 gain 0.06 of 0.64: 9 %
    assert plateau(improving[:2 * PLATEAU_EPOCHS - 1]) is None  # too early to judge
    assert plateau(improving) is None
    flat = [1.0, 0.6, 0.45, 0.40, 0.39, 0.385, 0.384, 0.3838]  # the last 3 gain 0.0062 of 0.6162: 1 %
    recent, since_first = plateau(flat)
    assert math.isclose(recent, 0.39 - 0.3838) and math.isclose(since_first, 1.0 - 0.3838)
    assert plateau([0.5, 0.6, 0.7, 0.8, 0.9, 1.0]) == (0.0, 0.0)  # a run that never improves has stopped too
    worse_lately = [1.0, 0.5, 0.4, 0.3, 0.2, 0.35, 0.4, 0.45]  # the best lies before the window: no gain in it
    assert plateau(worse_lately)[0] == 0.0


def test_the_anneal_after_a_plateau_is_the_last_fifth_of_a_run_that_long():
    assert [anneal_epochs(e) for e in (1, 4, 12, 13, 16)] == [1, 1, 3, 4, 4]
    # decay from step 40 to 60: full rate before, half at the middle, ~0 at the end, never below 0 after it
    assert schedule_factor("anneal", 39, 60, decay_start=40) == 1.0
    assert math.isclose(schedule_factor("anneal", 50, 60, decay_start=40), 0.5)
    assert schedule_factor("anneal", 59, 60, decay_start=40) < 0.01 and schedule_factor("anneal", 70, 60, 40) == 0.0


@pytest.mark.parametrize("flags, want", [({"amx_bf16", "avx512f"}, "bf16"), ({"avx512f", "avx512_bf16"}, "bf16"),
                                         ({"avx2", "fma"}, "fp32"), (set(), "fp32")])
def test_fastest_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, flags, want):
    monkeypatch.setattr(schedule, "_cpu_flags", lambda: flags)
    precision, why = fastest_precision(torch.device("cpu"))
    assert precision == want
    assert ("emulated" in why) == (want == "fp32")


def _feats(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, 64 // s, 64 // s, generator=g) * 2 + 1
            for c, s in zip(model.backbone.channels, model.backbone.strides)]


def _run_fit(monkeypatch, cfg, stop_at):
    """fit() on random features with plateau() reporting a stop from epoch `stop_at` on; the learning rates seen."""
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64, flow_steps=1))
    monkeypatch.setattr(fit_mod, "plateau", lambda nlls: (0.0, 1.0) if len(nlls) >= stop_at else None)
    rates, real_step = [], fit_mod.train_step

    def recording_step(model, feats, step, flow_opt, base_opt, cfg):
        rates.append(flow_opt.param_groups[0]["lr"])
        return real_step(model, feats, step, flow_opt, base_opt, cfg)

    monkeypatch.setattr(fit_mod, "train_step", recording_step)
    held_out = [FrameTiles((64, 64), ((0, 0),))] * 2
    history, _ = fit_mod.fit(model, _feats(model, 4, 1), _feats(model, 2, 2), held_out, cfg, torch.device("cpu"))
    return history, rates


def test_early_stop_anneals_then_ends_the_run(monkeypatch, capsys):
    cfg = TrainConfig(epochs=20, batch_size=2, lr=1e-3)
    history, rates = _run_fit(monkeypatch, cfg, stop_at=6)
    assert len(history) == 6 + anneal_epochs(6)  # 8 of 20
    assert rates[:12] == [1e-3] * 12  # full rate through the 6 epochs (2 steps each) before the plateau
    tail = rates[12:]
    assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < 0.2e-3
    assert "stopped improving" in capsys.readouterr().out


@pytest.mark.parametrize("change", [{"early_stop": False}, {"lr_schedule": "cosine"}])
def test_no_early_stop_runs_every_epoch(monkeypatch, change):
    history, _ = _run_fit(monkeypatch, TrainConfig(epochs=9, batch_size=2, **change), stop_at=6)
    assert len(history) == 9


def test_a_plateau_near_the_cap_keeps_the_planned_anneal(monkeypatch):
    history, rates = _run_fit(monkeypatch, TrainConfig(epochs=10, batch_size=2), stop_at=9)
    assert len(history) == 10 and rates[16] == 1e-3 and rates[17] < 1e-3  # the last fifth: from step 16 on


def _step_grads(model, feats, precision):
    cfg = TrainConfig(precision=precision)
    flow_opt, base_opt = make_optimisers(model, cfg)
    flow_opt.step = lambda: None  # keep the weights: both precisions see the same model
    loss = train_step(model, feats, 0, flow_opt, base_opt, cfg)
    return loss, torch.cat([p.grad.flatten() for p in model.flow_parameters()])


def _compare_precisions(model, feats):
    """bf16 autocast against the fp32 reference on one step: loss within 1 %, gradient cosine >= 0.99, norms within
    5 % (bf16 carries 8 bits of mantissa; the convolutions accumulate in fp32)."""
    loss32, g32 = _step_grads(model, feats, "fp32")
    loss16, g16 = _step_grads(model, feats, "bf16")
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32), (loss16, loss32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) >= 0.99
    assert abs(g16.norm() / g32.norm() - 1) <= 0.05


def test_a_bf16_step_matches_the_fp32_reference_on_random_features():
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=64))
    feats = _feats(model, 8, 3)
    trained_a_little(model, feats)
    _compare_precisions(model, feats)


@pytest.mark.skipif(not (MTD / "train" / "good").is_dir(), reason="needs ../shared/data/mtd (real images)")
def test_a_bf16_step_matches_the_fp32_reference_on_real_images():
    model, feats = mtd_model_and_features()
    trained_a_little(model, feats)
    _compare_precisions(model, feats)


def test_a_resume_trains_at_this_machines_precision_not_the_parents(monkeypatch):
    import argparse

    from train.resume import resume_config

    parent = {**vars(TrainConfig(precision="bf16")), "epochs": 25}
    args = argparse.Namespace(train_precision="auto", train_step="auto", device="cpu", no_early_stop=False)
    monkeypatch.setattr(schedule, "_cpu_flags", lambda: {"avx2"})
    assert resume_config(parent, set(), args).precision == "fp32"
    monkeypatch.setattr(schedule, "_cpu_flags", lambda: {"amx_bf16"})
    assert resume_config({k: v for k, v in parent.items() if k != "precision"}, set(), args).precision == "bf16"
    assert resume_config(parent, set(), args).step == "fused"  # the parent's eager step is not kept either
    args.train_precision = "fp32"
    assert resume_config(parent, {"train_precision"}, args).precision == "fp32"
    assert resume_config(parent, {"train_precision"}, args).step == "eager"  # fp32 asked for: the reference path
