"""The flow's training cost in FLOPs, counted from the model's convolutions (the elementwise work is counted in bytes
apart: it is memory-bound), for the performance notebook (benchmarks/NOTES.md, "Training at the floor").

    python -m benchmarks.train_flops --input 640x256 --train 518 --holdout 57     # BSD's default fit
    python -m benchmarks.train_flops --input 256x256 --train 686 --holdout 76     # MTD's

A flow step costs forward + backward (gradients of inputs and of weights: 2x the forward's multiply-adds); the base's
turn of AltUB (every altub_every-th step) runs the flow forward only; the held-out pass once an epoch, forward only.
"""

from __future__ import annotations

import argparse

import torch

from engine.common.geometry import parse_size
from train.fit import TrainConfig
from train.model import FastFlow, FlowConfig


def flow_forward_flops(hw: tuple[int, int]) -> tuple[float, float]:
    """(convolution FLOPs, activation bytes of one fp32 pass: the coupling steps' inputs) of the flow, one image."""
    model = FastFlow(FlowConfig(input_size=hw))
    flops, act = 0.0, 0.0
    for scale, (c, stride) in enumerate(zip(model.backbone.channels, model.backbone.strides)):
        pixels = (hw[0] // stride) * (hw[1] // stride)
        for step in model.flows[scale]:
            for conv in (step.subnet[0], step.subnet[2]):
                k = conv.kernel_size[0] * conv.kernel_size[1]
                flops += 2 * pixels * conv.out_channels * conv.in_channels * k
            act += 4 * pixels * c
    return flops, act


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default="640x256", help="the model's input, WxH")
    p.add_argument("--train", type=int, default=518, help="training images (tiles) an epoch")
    p.add_argument("--holdout", type=int, default=57, help="held-out images scored an epoch")
    args = p.parse_args()
    hw = parse_size(args.input)
    fwd, act = flow_forward_flops(hw)
    every = TrainConfig().altub_every
    per_image = fwd * (3 * (every - 1) + 1) / every  # flow turns: forward + backward; base turns: forward
    epoch = per_image * args.train + fwd * args.holdout
    print(f"flow at {args.input}: {fwd / 1e9:.2f} GFLOP forward an image ({act / 2**20:.1f} MiB of coupling inputs, "
          f"fp32); a training image {per_image / 1e9:.2f} GFLOP; an epoch ({args.train} + {args.holdout} held out) "
          f"{epoch / 1e12:.3f} TFLOP")


if __name__ == "__main__":
    with torch.no_grad():
        main()
