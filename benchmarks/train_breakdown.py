"""Where an epoch of train.fit goes, per precision and step: the flow's forward (with autograd), its backward and the
Adam step, the AltUB base's turn (every altub_every-th step: the flow forward without autograd, the base's step), and
the held-out pass (the flow on the held-out images, the map units calibrated, their scores). Medians of a few rounds on
random features at a data set's default input, batch 16 (`--batch`), for the performance notebook (benchmarks/NOTES.md).

    python -m benchmarks.train_breakdown --input 640x256 --train 518 --holdout 57     # BSD's default fit
    python -m benchmarks.train_breakdown --input 256x256 --train 686 --holdout 76     # MTD's
    python -m benchmarks.train_breakdown --device cuda                                # on a GPU (gpu_check.sh)
    python -m benchmarks.train_breakdown --input 256x256 --train 686 --holdout 76 --batch 32   # round 21's batch
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from engine.common.geometry import parse_size
from train.fit import TrainConfig, calibrate_scales, make_optimisers, score_cached, train_step
from train.model import FastFlow, FlowConfig
from train.schedule import fastest_precision, fastest_step
from train.tiles import FrameTiles, flow_frames


def _median_s(fn, device: torch.device, rounds: int = 5) -> float:
    def timed() -> float:
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()
    return statistics.median(timed() for _ in range(rounds))


def breakdown(hw: tuple[int, int], precision: str, step: str, n_train: int, n_hold: int, device: torch.device,
              batch: int = 16) -> dict[str, float]:
    """Seconds an epoch spends in each part, from per-call medians times the calls an epoch makes."""
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=hw)).to(device)
    with torch.no_grad():
        feats = [torch.randn_like(f) for f in model.features(torch.rand(batch, 3, *hw, device=device))]
    cfg = TrainConfig(precision=precision, step=step)
    model.fused_tail = step == "fused"
    flow_opt, base_opt = make_optimisers(model, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    state = {}

    def forward():
        with autocast:
            state["loss"] = model.nll_per_dim(*model.flow(feats)).mean()

    def backward_and_step():
        forward()
        model.zero_grad(set_to_none=True)
        state["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.flow_parameters(), cfg.grad_clip)
        flow_opt.step()

    hold = [f[:1].repeat(n_hold, 1, 1, 1) for f in feats]
    frames = [FrameTiles(hw, ((0, 0),))] * n_hold

    def held_out():
        model.eval()
        with torch.no_grad():
            flowed = list(flow_frames(model, hold, frames, device))
            calibrate_scales(model, (zs for _, zs, _ in flowed))
            score_cached(model, flowed)
        model.train()

    t_forward = _median_s(forward, device)
    t_step = _median_s(backward_and_step, device) - t_forward
    t_base = _median_s(lambda: train_step(model, feats, cfg.altub_every - 1, flow_opt, base_opt, cfg), device)
    steps = math.ceil(n_train / batch)
    base_turns = steps // cfg.altub_every
    flow_turns = steps - base_turns
    return {"flow forward": flow_turns * t_forward, "backward + Adam": flow_turns * t_step,
            "AltUB base turns": base_turns * t_base, "held-out pass": _median_s(held_out, device, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="640x256", help="the model's input, WxH")
    p.add_argument("--train", type=int, default=518, help="training images an epoch")
    p.add_argument("--holdout", type=int, default=57, help="held-out images scored an epoch")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=16, help="images a step (train.fit's --batch-size)")
    args = p.parse_args()
    hw, device = parse_size(args.input), torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    default = fastest_precision(device)[0], fastest_step(device, "auto")[0]
    print(f"an epoch at {args.input}, {args.train} training + {args.holdout} held-out images, batch {args.batch}, "
          f"{where}; {' '.join(default)} is train.fit's default here (seconds)")
    for precision, step in dict.fromkeys([("fp32", "eager"), ("bf16", "eager"), ("fp32", default[1]), default]):
        parts = breakdown(hw, precision, step, args.train, args.holdout, device, args.batch)
        print(f"{precision} {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
              + f"; total {sum(parts.values()):.1f}")


if __name__ == "__main__":
    main()
