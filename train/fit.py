"""python -m train.fit --data DIR --out model.pt: train FastFlow + AltUB on good images only.

The backbone is frozen, so its features are computed once and cached in memory; the flow then
trains on the cache. A tenth of the good images is held out: their likelihood is logged every
epoch and their image scores set the decision threshold (no defect labels needed).

AltUB alternation (the rule we ship): optimisation steps are counted globally; every
`altub_every`-th step only the base (mean, log-scale per channel per scale) takes a step, with
its own Adam at `base_lr` and gradient-norm clipping; every other step only the flow steps.
Alternation is AltUB's answer to the flow and the base both being able to move z's mean and scale
(Kim et al. 2022; we did not test simultaneous updates). Defaults follow the public
FastFlow+AltUB code (every 5th step, Adam, gradients clipped at 100); the base learning rate is
10x the flow's (docs/results.md has the A/B against plain FastFlow).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.common.cli import HelpFormatter
from engine.common.errors import RunError, UserError, run_cli
from engine.common.files import check_output
from engine.common.geometry import PIXEL_BUDGET, choose_input_size, format_size, parse_size
from engine.common.images import images_in, read_image
from train.backbones import BACKBONES, create_backbone
from train.checkpoint import DataInfo, ModelMeta, Threshold, save_model
from train.data import SIZE_GROUPS_MAX, image_sizes, size_weights, train_images
from train.input_stats import input_stats
from train.model import BLUR_MODES, FUSIONS, IMAGE_SCALES, MAP_SCALES, POOL_SCALES, FastFlow, FlowConfig
from train.schedule import (
    LR_SCHEDULES,
    PLATEAU_EPOCHS,
    PLATEAU_SHARE,
    TRAIN_PRECISIONS,
    TRAIN_STEPS,
    anneal_epochs,
    fastest_precision,
    fastest_step,
    plateau,
    schedule_factor,
    set_learning_rates,
)
from train.threshold import THRESHOLD_RULES, from_defects, from_good
from train.tiles import FrameTiles, flow_frames, frame_tiles, score_frames

__all__ = ["DEVICES", "TrainConfig", "fit", "calibrate_scales", "train_step", "make_optimisers",
           "extract_features", "split_holdout", "main"]


DEVICES = ("cpu", "cuda")  # where features and flow run (train.fit, train.evaluate)
FEATURE_BATCH = {"cpu": 2, "cuda": 16}  # tiles a backbone call while caching features (CPUs: small ones stay in cache)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25  # the most epochs; with early_stop, fewer once the held-out likelihood stops improving
    batch_size: int = 16
    lr: float = 1e-3  # flow (Adam)
    weight_decay: float = 1e-5
    altub_every: int = 5  # every k-th optimisation step updates only the base
    base_lr: float = 1e-2  # base (Adam), with AltUB
    lr_schedule: str = "anneal"  # both rates decay to 0 over the last fifth of the run ("cosine": all of it)
    grad_clip: float = 100.0  # max gradient norm, flow and base
    holdout_fraction: float = 0.1  # good images kept out of training, for the threshold
    balance_sizes: bool = False  # frames of a rare size drawn more often (train.data.size_weights)
    threshold_rule: str = THRESHOLD_RULES[0]  # how held-out good scores set the threshold (train/threshold.py)
    seed: int = 0
    early_stop: bool = True  # end once the held-out NLL stops improving, annealed (train/schedule.py); "anneal" only
    precision: str = "fp32"  # the flow's forward: "fp32" (the reference) or "bf16" autocast (train.fit's CLI picks
    # the machine's fastest, train.schedule.fastest_precision); loss, gradients' sums and optimiser state stay fp32
    step: str = "eager"  # the coupling's element-wise tail: "eager" PyTorch (the reference) or "fused", one native
    # pass each way on CPUs (train/fused_tail.py; the CLI picks it where it runs, train.schedule.fastest_step)


def split_holdout(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministic split of the good images into (train, held-out); at least one of each."""
    if len(paths) < 2:
        raise UserError(f"{paths[0].parent}: needs at least 2 good images (one is held out to set the "
                        f"threshold), found {len(paths)}")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_hold = min(len(paths) - 1, max(1, round(fraction * len(paths))))
    hold = sorted(paths[i] for i in order[:n_hold])
    return sorted(paths[i] for i in order[n_hold:]), hold


@torch.no_grad()
def extract_features(model: FastFlow, paths: list[Path], device: torch.device,
                     desc: str) -> tuple[list[torch.Tensor], list[FrameTiles]]:
    """Frozen backbone features of every tile of every image (an image resized whole is one tile), per
    scale [(N_tiles, C, h, w)] on the CPU, and where each image's tiles lie (train/tiles.py), in order;
    the backbone runs FEATURE_BATCH[device.type] tiles a call."""
    batch_size = FEATURE_BATCH[device.type]
    per_scale: list[list[torch.Tensor]] = []
    frames: list[FrameTiles] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        tiles = torch.cat(pending)
        pending.clear()
        for i in range(0, len(tiles), batch_size):
            batch = tiles[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            feats = model.features(batch)
            per_scale.extend([] for _ in range(len(feats) - len(per_scale)))
            for acc, f in zip(per_scale, feats):
                acc.append(f.cpu().contiguous())

    # channels-last keeps the depthwise backbone's small batches fast on CPUs (benchmarks/NOTES.md, "int8 on an
    # AVX2-only CPU, and caching features channels-last"); the features are the same to 1e-4
    model.backbone.to(memory_format=torch.channels_last)
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", leave=False) as bar:
            for path in paths:
                tiles, where = frame_tiles(read_image(path), model.config)
                frames.append(where)
                pending.append(tiles)
                if sum(len(t) for t in pending) >= batch_size:
                    flush()
                bar.update(1)
            if pending:
                flush()
    finally:  # a bad image raises mid-way: the model the caller holds goes back to its usual layout all the same
        model.backbone.to(memory_format=torch.contiguous_format)
    return [torch.cat(acc) for acc in per_scale], frames


@torch.no_grad()
def calibrate_scales(model: FastFlow, zs_batches: Iterable[list[torch.Tensor]]) -> None:
    """Set each scale's median and 99th percentile of pixel NLL over held-out good images (map units), from the
    flow's output on them (batches of per-scale z)."""
    per_scale = None
    for zs in zs_batches:
        nlls = [n.flatten().cpu().numpy() for n in model.pixel_nll(zs)]
        per_scale = [[n] for n in nlls] if per_scale is None else [a + [n] for a, n in zip(per_scale, nlls)]
    stats = []
    for chunks in per_scale:
        median, q99 = np.quantile(np.concatenate(chunks), [0.5, 0.99])
        stats.append([median, max(q99, median + 1e-6)])
    model.scale_stats.copy_(torch.tensor(stats, dtype=model.scale_stats.dtype))


def score_cached(model: FastFlow, flowed) -> tuple[np.ndarray, np.ndarray]:
    """Per image: NLL per dimension (its tiles' mean) and image score, from the flow's output on cached features
    (train.tiles.flow_frames)."""
    rows = [(nll, score) for _, score, _, nll in score_frames(model, flowed)]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def train_step(model: FastFlow, feats: list[torch.Tensor], step: int, flow_opt: torch.optim.Optimizer,
               base_opt: torch.optim.Optimizer | None, cfg: TrainConfig) -> float:
    """One optimisation step: the base's turn every `altub_every`-th step (AltUB), else the flow's.

    The base acts on z after the flow, so on its turn the flow runs without autograd: the base's gradient is
    the same, and no backward pass through the flow is spent on those steps (every 5th at the default)."""
    base_turn = base_opt is not None and (step + 1) % cfg.altub_every == 0
    model.fused_tail = cfg.step == "fused"
    with torch.set_grad_enabled(not base_turn), \
            torch.autocast(feats[0].device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        zs, logdet = model.flow(feats)  # bf16: the convolutions in bf16, z and log|det J| come out fp32
    loss = model.nll_per_dim(zs, logdet).mean()
    opt, params = (base_opt, model.base_parameters()) if base_turn else (flow_opt, model.flow_parameters())
    model.zero_grad(set_to_none=True)  # both sets: the idle one must not accumulate gradients
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return loss.item()


def make_optimisers(model: FastFlow, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    flow_opt = torch.optim.Adam(model.flow_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_opt = torch.optim.Adam(model.base_parameters(), lr=cfg.base_lr) if model.config.altub else None
    return flow_opt, base_opt


def fit(model: FastFlow, train_feats: list[torch.Tensor], hold_feats: list[torch.Tensor], hold_frames: list[FrameTiles],
        cfg: TrainConfig, device: torch.device, on_epoch=None,
        weights: torch.Tensor | None = None) -> tuple[list[dict], np.ndarray]:
    """Train the flow (and the AltUB base) on cached features (of tiles, where the model tiles frames).

    `weights`: per training tile, how often an epoch draws it (as many draws as tiles, with replacement);
    None: each tile once an epoch. With cfg.early_stop and the "anneal" schedule, the run ends early once the held-out
    NLL stops improving (train/schedule.py). Returns one history row per epoch run and the held-out image scores after
    the last.
    """
    if cfg.precision not in TRAIN_PRECISIONS:
        raise ValueError(f"precision must be one of {TRAIN_PRECISIONS}, not {cfg.precision!r}")
    if cfg.step not in TRAIN_STEPS:
        raise ValueError(f"step must be one of {TRAIN_STEPS}, not {cfg.step!r}")
    model.fused_tail = cfg.step == "fused"  # the held-out passes too
    flow_opt, base_opt = make_optimisers(model, cfg)
    rates = [(flow_opt, cfg.lr), (base_opt, cfg.base_lr)]
    gen = torch.Generator().manual_seed(cfg.seed)
    n, step, history = len(train_feats[0]), 0, []
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    last_epoch, total_steps, decay_start = cfg.epochs, cfg.epochs * steps_per_epoch, None
    epoch = 0
    while epoch < last_epoch:
        epoch += 1
        model.train()
        t0, losses = time.perf_counter(), []
        order = torch.randperm(n, generator=gen) if weights is None else \
            torch.multinomial(weights, n, replacement=True, generator=gen)
        batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        with tqdm(batches, desc=f"epoch {epoch}/{last_epoch}", unit="batch", leave=False) as bar:
            for idx in bar:
                if cfg.lr_schedule != "constant":
                    set_learning_rates(rates, schedule_factor(cfg.lr_schedule, step, total_steps, decay_start))
                loss = train_step(model, [f[idx].to(device) for f in train_feats], step, flow_opt, base_opt, cfg)
                if not math.isfinite(loss):
                    raise RunError(f"training diverged at epoch {epoch}, step {step} (loss {loss}); no model written; "
                                   f"try a lower --lr (now {cfg.lr:g})")
                step += 1
                losses.append(loss)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        flowed = list(flow_frames(model, hold_feats, hold_frames, device))  # one flow pass: units, then scores
        calibrate_scales(model, (zs for _, zs, _ in flowed))
        hold_nll, hold_scores = score_cached(model, flowed)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "holdout_nll": float(hold_nll.mean()),
               "holdout_score_median": float(np.median(hold_scores)), "seconds": time.perf_counter() - t0}
        history.append(row)
        tqdm.write(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  held-out nll {row['holdout_nll']:.4f}  "
                   f"({row['seconds']:.1f} s)")
        if on_epoch is not None:
            on_epoch(epoch, hold_scores, history)
        gains = plateau([r["holdout_nll"] for r in history]) if decay_start is None and cfg.early_stop and \
            cfg.lr_schedule == "anneal" else None
        if gains is not None:
            tail = anneal_epochs(epoch)
            if epoch + tail < last_epoch:  # else the planned run's own anneal comes as soon
                last_epoch, decay_start, total_steps = epoch + tail, step, step + tail * steps_per_epoch
                tqdm.write(f"held-out nll gained {gains[0]:.4f} over the last {PLATEAU_EPOCHS} epochs, under "
                           f"{PLATEAU_SHARE:.0%} of its {gains[1]:.4f} since epoch 1: it has stopped improving; the "
                           f"learning rates decay over {tail} more epochs, then training stops (at {last_epoch} of "
                           f"{cfg.epochs}; --no-early-stop runs all)")
    return history, hold_scores


def _parser() -> argparse.ArgumentParser:
    from train.resume import RESUME_EPOCHS, RESUME_LR_FACTOR, RESUME_SCHEDULE  # it imports this module
    d, m = TrainConfig(), FlowConfig()
    p = argparse.ArgumentParser(prog="python -m train.fit", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", help="MVTec-layout folder (uses train/good) or a folder of good images (with --resume: "
                   "where the model's training frames are now, if not where it was trained)")
    p.add_argument("--out", required=True, help="model file to write (written atomically)")
    p.add_argument("--resume", metavar="MODEL",
                   help="relearn MODEL (a model.pt train.fit wrote) on its training frames plus --add-good's, its "
                   f"backbone, input and scoring kept, the threshold re-derived by its rule; then --epochs defaults "
                   f"to {RESUME_EPOCHS}, the learning rates to {RESUME_LR_FACTOR:g} x the model's ({RESUME_SCHEDULE}) "
                   "(train/resume.py)")
    p.add_argument("--add-good", metavar="DIR", help="with --resume: a folder of new good frames")
    p.add_argument("--backbone", default=m.backbone, choices=sorted(BACKBONES), help="frozen feature extractor")
    p.add_argument("--backbone-weights", metavar="PATH",
                   help="ImageNet checkpoint (torchvision/timm) for resnet18 / wide_resnet50_2")
    p.add_argument("--input-size", default="auto", metavar="WxH",
                   help="the model's input, WIDTHxHEIGHT (each a multiple of 32; N means N x N) that every image is "
                   "resized to; auto: the training images' median aspect ratio and scale within "
                   f"{PIXEL_BUDGET:,} pixels (images of widely mixed aspect: a square)")
    p.add_argument("--tile-scale", type=float, default=m.tile_scale, metavar="S",
                   help="0: each image is resized whole to the input; S > 0: images are resized by S (1 = their own "
                   "pixels) and cut into overlapping tiles of the input's size, in training and at run time alike")
    p.add_argument("--tile-overlap", type=float, default=m.tile_overlap, metavar="F",
                   help="with --tile-scale: neighbouring tiles overlap by at least this share of a tile's side")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="the most passes over the training images (early stopping may end the run sooner)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="run every epoch; by default training ends once the held-out good images' likelihood "
                   f"gains less over {PLATEAU_EPOCHS} epochs than {PLATEAU_SHARE:.0%}% of its gain since the first, "
                   "after the learning rates' anneal (train/schedule.py)")
    p.add_argument("--train-precision", default="auto", choices=("auto", *TRAIN_PRECISIONS),
                   help="the flow's training arithmetic: auto picks the fastest the machine computes (bf16 on a CPU "
                   "with AMX-BF16 or AVX512-BF16 or a GPU with bf16, else fp32) and says which; fp32 is the "
                   "reference path (the loss and the optimiser are fp32 either way)")
    p.add_argument("--train-step", default="auto", choices=("auto", *TRAIN_STEPS),
                   help="how the coupling steps train: fused runs everything between their convolutions as one "
                   "native pass each way (CPU); eager is plain PyTorch, the reference; auto: fused on a CPU, eager "
                   "on a GPU and with --train-precision fp32")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per optimisation step")
    p.add_argument("--lr", type=float, default=d.lr, help="flow learning rate (Adam)")
    p.add_argument("--flow-steps", type=int, default=m.flow_steps, help="coupling steps per scale")
    p.add_argument("--hidden-ratio", type=float, default=m.hidden_ratio,
                   help="subnet hidden channels / input channels")
    p.add_argument("--clamp", type=float, default=m.clamp, help="bound of the coupling's soft-clamped log-scale")
    p.add_argument("--no-altub", action="store_true", help="plain FastFlow: fixed N(0, I) base")
    p.add_argument("--altub-every", type=int, default=d.altub_every, help="every k-th step updates only the base")
    p.add_argument("--base-lr", type=float, default=d.base_lr, help="AltUB base learning rate (Adam)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES,
                   help="constant learning rates, or both decaying to 0 along a half cosine: over the whole run "
                   "(cosine) or over its last fifth (anneal)")
    p.add_argument("--feature-pool", type=int, default=m.feature_pool, metavar="K",
                   help="average backbone features over K x K neighbours before the flow; 1 = off")
    p.add_argument("--pool-scales", default=m.pool_scales, choices=POOL_SCALES,
                   help="the scales whose features are averaged: the coarse ones (strides 16, 32; small defects stay "
                   "sharp at 4 and 8) or all")
    p.add_argument("--blur-sigma", type=float, default=m.blur_sigma, metavar="PX",
                   help="anomaly-map smoothing of the stride-4 map, in input pixels; 0 = off")
    p.add_argument("--blur-mode", default=m.blur_mode, choices=BLUR_MODES,
                   help="each scale's map blurred by half its cell (stride: --blur-sigma x stride / 4) or all by "
                   "--blur-sigma (fixed)")
    p.add_argument("--fusion", default=m.fusion, choices=FUSIONS,
                   help="combine scales in units of held-out good pixels (the one fusion engines build)")
    p.add_argument("--image-score-top", type=float, default=m.image_score_top, metavar="FRACTION",
                   help="image score = mean of this fraction of the map's highest pixels; 0 = the max")
    p.add_argument("--map-scales", default=m.map_scales, choices=MAP_SCALES,
                   help="the scales the anomaly map fuses: strides 4, 8, 16 (fine) or all four")
    p.add_argument("--image-scales", default=m.image_scales, choices=IMAGE_SCALES,
                   help="the map the image score reads: strides 16 + 32 (coarse), 32 only, or all four scales")
    p.add_argument("--threshold-rule", default=d.threshold_rule, choices=THRESHOLD_RULES,
                   help="how the held-out good images' scores set the pass/fail threshold: their median + 4 robust "
                   "standard deviations (robust), or their 99%% quantile (quantile)")
    p.add_argument("--threshold-defects", metavar="DIR",
                   help="a folder of a few defect images (not the test set): the threshold then best separates "
                   "them from the held-out good images (most caught minus good rejected: it catches more and rejects "
                   "more good images than the default rule)")
    p.add_argument("--balance-sizes", action="store_true",
                   help="where the training images come in 2-"
                   f"{SIZE_GROUPS_MAX} sizes of unequal counts (two cameras, a rig setting changed), draw each by "
                   "count^-1/2 so that a rare size is not underfit (BSD, four seeds: image AUROC +0.003, pixel AUROC "
                   "level, held-out likelihood lower; docs/lab/search-rounds.md, round 18)")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out split, initialisation and batch order")
    p.add_argument("--device", default=DEVICES[0], choices=DEVICES, help="where features and flow run")
    p.add_argument("--epoch-checkpoints", metavar="DIR",
                   help="also write DIR/epoch_NNN.pt after every epoch (to study stability)")
    return p


def _draw_weights(sizes: list[tuple[int, int]], frames: list[FrameTiles]) -> torch.Tensor | None:
    """Per training tile, its frame's draw weight (train.data.size_weights), saying so when sizes are balanced."""
    weights = size_weights(sizes)
    if weights is None:
        return None
    counts, total = Counter(sizes), weights.sum()
    print("frame sizes of unequal counts, each frame drawn by count^-1/2 (--balance-sizes): "
          + ", ".join(f"{w}x{h} {n} frames, {n ** 0.5 / total:.0%} of the draws" for (h, w), n in counts.most_common()))
    return torch.tensor([w for w, f in zip(weights.tolist(), frames) for _ in f.starts], dtype=torch.float64)


def _report_sizes(model: FastFlow, feats: list[torch.Tensor], frames: list[FrameTiles], sizes: list[tuple[int, int]],
                  threshold: float, balanced: bool, device: torch.device) -> None:
    """Where training frames come in a few sizes of unequal counts: their image scores' median per size, beside the
    threshold. A size whose own training frames score near the threshold is underfit (a rare camera or setting)."""
    if size_weights(sizes) is None:
        return
    scores = score_cached(model, flow_frames(model, feats, frames, device))[1]
    by_size = {}
    for size, score in zip(sizes, scores):
        by_size.setdefault(size, []).append(score)
    print("training frames' image scores by size: "
          + ", ".join(f"{w}x{h} ({len(v)}) median {np.median(v):.3f}"
                      for (h, w), v in sorted(by_size.items(), key=lambda kv: -len(kv[1])))
          + f"; threshold {threshold:.3f}" + ("" if balanced else " (a size whose frames score near the threshold "
                                                "is underfit: --balance-sizes draws it more often)"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.resume or args.add_good:
        from train import resume  # imports this module: the resumed run is train.fit's fit on more frames
        return resume.main(args, resume.given_options(_parser(), argv))
    if not args.data:
        raise UserError("--data DIR is required (or --resume MODEL --add-good DIR)")
    for name in ("epochs", "batch_size", "flow_steps", "altub_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.lr > 0 and args.base_lr > 0 and args.hidden_ratio > 0 and args.clamp > 0 and args.blur_sigma >= 0):
        raise UserError("--lr, --base-lr, --hidden-ratio and --clamp must be positive, --blur-sigma non-negative")
    out = check_output("--out", args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this PyTorch")
    device = torch.device(args.device)

    precision, why = (args.train_precision, "--train-precision") if args.train_precision != "auto" else \
        fastest_precision(device)
    step, step_why = (args.train_step, "--train-step") if args.train_step != "auto" else \
        fastest_step(device, args.train_precision)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, altub_every=args.altub_every,
                      base_lr=args.base_lr, lr_schedule=args.lr_schedule, threshold_rule=args.threshold_rule,
                      balance_sizes=args.balance_sizes, seed=args.seed, early_stop=not args.no_early_stop,
                      precision=precision, step=step)
    paths = train_images(args.data)
    size_of = dict(zip(paths, image_sizes(paths)))  # (height, width) from each header, read once
    try:
        if args.input_size == "auto":
            scale = args.tile_scale or 1.0  # tiles: the shape and scale the images have once resized
            input_size = choose_input_size([(round(h * scale), round(w * scale)) for h, w in size_of.values()])
        else:
            input_size = parse_size(args.input_size)
    except ValueError as e:
        raise UserError(f"--input-size: {e}") from None
    try:  # FlowConfig checks its own fields; one place for the rules
        model_cfg = FlowConfig(backbone=args.backbone, input_size=input_size, tile_scale=args.tile_scale,
                               tile_overlap=args.tile_overlap, flow_steps=args.flow_steps,
                               hidden_ratio=args.hidden_ratio, altub=not args.no_altub, blur_sigma=args.blur_sigma,
                               fusion=args.fusion, image_score_top=args.image_score_top, image_scales=args.image_scales,
                               map_scales=args.map_scales, clamp=args.clamp,
                               feature_pool=args.feature_pool, pool_scales=args.pool_scales,
                               blur_mode=args.blur_mode)
    except ValueError as e:
        raise UserError(f"invalid option: {e}") from None
    fit_paths, hold_paths = split_holdout(paths, cfg.holdout_fraction, cfg.seed)
    defect_paths = None
    if args.threshold_defects:
        folder = Path(args.threshold_defects)
        defect_paths = images_in(folder) if folder.is_dir() else None
        if not defect_paths:
            raise UserError(f"{folder}: --threshold-defects needs a folder with defect images")
    torch.manual_seed(cfg.seed)
    model = FastFlow(model_cfg, create_backbone(args.backbone, args.backbone_weights)).to(device)
    print(f"lineflow: {len(fit_paths)} training + {len(hold_paths)} held-out good images from {args.data}; "
          f"{args.backbone} at {format_size(input_size)} px{' (auto)' if args.input_size == 'auto' else ''}"
          f"{f' tiles of frames resized by {args.tile_scale:g}' if args.tile_scale else ''}, "
          f"{'AltUB' if model_cfg.altub else 'fixed N(0, I)'} base")
    stopping = "off (--no-early-stop)" if not cfg.early_stop else "on" if cfg.lr_schedule == "anneal" else \
        f"off (--lr-schedule {cfg.lr_schedule} plans the whole run)"
    reference = "" if (precision, step) == ("fp32", "eager") else "; --train-precision fp32: the reference path"
    print(f"training precision {precision} ({why}), {step} step ({step_why}{reference}); at most {cfg.epochs} "
          f"epochs, early stopping {stopping}")

    t_start = time.perf_counter()
    train_feats, train_frames = extract_features(model, fit_paths, device, "features (train)")
    hold_feats, hold_frames = extract_features(model, hold_paths, device, "features (held-out)")
    t_features = time.perf_counter() - t_start
    print(f"features cached in {t_features:.1f} s ({len(train_feats[0])} training tiles, "
          f"{sum(f.numel() * 4 for f in train_feats) / 2**20:.0f} MiB)")
    frame_stats = input_stats(paths)  # every good training frame, held-out too: what drift alarms compare with

    def meta(epoch: int, hold_scores: np.ndarray, history: list[dict]) -> ModelMeta:
        return ModelMeta(threshold=Threshold.from_dict(from_good(hold_scores, cfg.threshold_rule)),
                         train_config=asdict(cfg), epoch=epoch, history=history,
                         data=DataInfo(str(Path(args.data).resolve()), len(fit_paths), len(hold_paths)),
                         timing={"features_s": t_features, "total_s": time.perf_counter() - t_start},
                         input_stats=frame_stats)

    on_epoch = None
    if args.epoch_checkpoints:
        ckpt_dir = Path(args.epoch_checkpoints)
        ckpt_dir.mkdir(parents=True, exist_ok=True)

        def on_epoch(epoch, hold_scores, history):
            save_model(ckpt_dir / f"epoch_{epoch:03d}.pt", model, meta(epoch, hold_scores, history))

    sizes = [size_of[p] for p in fit_paths]
    history, hold_scores = fit(model, train_feats, hold_feats, hold_frames, cfg, device, on_epoch,
                               _draw_weights(sizes, train_frames) if cfg.balance_sizes else None)
    info = meta(len(history), hold_scores, history)
    if len(history) < cfg.epochs:
        print(f"stopped after {len(history)} of {cfg.epochs} epochs: the held-out likelihood had stopped improving")
    if defect_paths:
        defect_feats = extract_features(model, defect_paths, device, "features (defects)")
        defect_scores = score_cached(model, flow_frames(model, *defect_feats, device))[1]
        info = replace(info, threshold=Threshold.from_dict({
            **from_defects(hold_scores, defect_scores), f"{cfg.threshold_rule}_threshold": info.threshold.threshold}))
    if not math.isfinite(info.threshold.threshold):
        raise RuntimeError("held-out scores are not finite; training failed")
    _report_sizes(model, train_feats, train_frames, sizes, info.threshold.threshold, cfg.balance_sizes, device)
    save_model(out, model.cpu(), info)
    t = info.threshold
    how = {"robust": f"median + {t.spreads} robust std of",
           "quantile": f"{t.quantile or 0:.0%} quantile of",
           "defects": f"best split of {len(defect_paths or [])} defect images from"}[t.rule]
    print(f"wrote {out}  (threshold {t.threshold:.4f} = {how} {len(hold_paths)} held-out good images; "
          f"{info.timing['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    run_cli(main)
