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
10x the flow's (README has the A/B against plain FastFlow).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.common.errors import UserError, run_cli
from train.backbones import BACKBONES, create_backbone
from train.checkpoint import save_model
from train.data import load_batches, train_images
from train.model import FUSIONS, IMAGE_SCALES, MAP_SCALES, FastFlow, FlowConfig

__all__ = ["DEVICES", "LR_SCHEDULES", "TrainConfig", "fit", "calibrate_scales", "train_step", "make_optimisers",
           "extract_features", "split_holdout", "main"]


DEVICES = ("cpu", "cuda")  # where features and flow run (train.fit, train.evaluate)
LR_SCHEDULES = ("constant", "cosine", "anneal")
ANNEAL_FRACTION = 0.2  # "anneal": the share of the run, at its end, over which the learning rates decay


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25
    batch_size: int = 16
    lr: float = 1e-3  # flow (Adam)
    weight_decay: float = 1e-5
    altub_every: int = 5  # every k-th optimisation step updates only the base
    base_lr: float = 1e-2  # base (Adam), with AltUB
    lr_schedule: str = "anneal"  # both rates decay to 0 over the last fifth of the run ("cosine": all of it)
    grad_clip: float = 100.0  # max gradient norm, flow and base
    holdout_fraction: float = 0.1  # good images kept out of training, for the threshold
    threshold_quantile: float = 0.99  # of held-out good image scores
    seed: int = 0


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
def extract_features(model: FastFlow, paths: list[Path], batch_size: int, device: torch.device,
                     desc: str) -> list[torch.Tensor]:
    """Frozen backbone features of every image, per scale: [(N, C, h, w)] on the CPU."""
    per_scale: list[list[torch.Tensor]] = []
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False) as bar:
        for images in load_batches(paths, model.config.input_size, batch_size):
            feats = model.features(images.to(device))
            per_scale = per_scale or [[] for _ in feats]
            for acc, f in zip(per_scale, feats):
                acc.append(f.cpu())
            bar.update(len(images))
    return [torch.cat(acc) for acc in per_scale]


@torch.no_grad()
def calibrate_scales(model: FastFlow, feats: list[torch.Tensor], device: torch.device, batch_size: int = 32) -> None:
    """Set each scale's median and 99th percentile of pixel NLL over held-out good images (map units)."""
    per_scale = None
    for i in range(0, len(feats[0]), batch_size):
        zs, _ = model.flow([f[i:i + batch_size].to(device) for f in feats])
        nlls = [n.flatten().cpu().numpy() for n in model.pixel_nll(zs)]
        per_scale = [[n] for n in nlls] if per_scale is None else [a + [n] for a, n in zip(per_scale, nlls)]
    stats = []
    for chunks in per_scale:
        median, q99 = np.quantile(np.concatenate(chunks), [0.5, 0.99])
        stats.append([median, max(q99, median + 1e-6)])
    model.scale_stats.copy_(torch.tensor(stats, dtype=model.scale_stats.dtype))


@torch.no_grad()
def score_cached(model: FastFlow, feats: list[torch.Tensor], device: torch.device,
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per image: NLL per dimension and image score, from cached features."""
    nll, scores = [], []
    size = (model.config.input_size,) * 2
    for i in range(0, len(feats[0]), batch_size):
        zs, logdet = model.flow([f[i:i + batch_size].to(device) for f in feats])
        nll.append(model.nll_per_dim(zs, logdet).cpu())
        scores.append(model.score(zs, size)[1].cpu())
    return torch.cat(nll).numpy(), torch.cat(scores).numpy()


def train_step(model: FastFlow, feats: list[torch.Tensor], step: int, flow_opt: torch.optim.Optimizer,
               base_opt: torch.optim.Optimizer | None, cfg: TrainConfig) -> float:
    """One optimisation step: the base's turn every `altub_every`-th step (AltUB), else the flow's."""
    zs, logdet = model.flow(feats)
    loss = model.nll_per_dim(zs, logdet).mean()
    base_turn = base_opt is not None and (step + 1) % cfg.altub_every == 0
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


def schedule_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning-rate multiplier at `step`: 1 for "constant"; a half cosine to 0 over the whole run
    ("cosine") or over its last ANNEAL_FRACTION ("anneal", constant before)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {schedule!r}")
    if schedule == "constant":
        return 1.0
    start = 0 if schedule == "cosine" else int(total_steps * (1 - ANNEAL_FRACTION))
    if step < start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - start) / (total_steps - start)))


def set_learning_rates(flow_opt: torch.optim.Optimizer, base_opt: torch.optim.Optimizer | None, cfg: TrainConfig,
                       factor: float) -> None:
    """Both optimisers at `factor` x their configured learning rate."""
    for opt, lr in ((flow_opt, cfg.lr), (base_opt, cfg.base_lr)):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr * factor


def fit(model: FastFlow, train_feats: list[torch.Tensor], hold_feats: list[torch.Tensor], cfg: TrainConfig,
        device: torch.device, on_epoch=None) -> tuple[list[dict], np.ndarray]:
    """Train the flow (and the AltUB base) on cached features.

    Returns one history row per epoch and the held-out image scores after the last epoch.
    """
    flow_opt, base_opt = make_optimisers(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, step, history = len(train_feats[0]), 0, []
    total_steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, losses = time.perf_counter(), []
        order = torch.randperm(n, generator=gen)
        batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        with tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False) as bar:
            for idx in bar:
                if cfg.lr_schedule != "constant":
                    set_learning_rates(flow_opt, base_opt, cfg, schedule_factor(cfg.lr_schedule, step, total_steps))
                loss = train_step(model, [f[idx].to(device) for f in train_feats], step, flow_opt, base_opt, cfg)
                if not math.isfinite(loss):
                    raise RuntimeError(f"training diverged at epoch {epoch} (loss {loss}); try a lower --lr")
                step += 1
                losses.append(loss)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        calibrate_scales(model, hold_feats, device)
        hold_nll, hold_scores = score_cached(model, hold_feats, device)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "holdout_nll": float(hold_nll.mean()),
               "holdout_score_median": float(np.median(hold_scores)), "seconds": time.perf_counter() - t0}
        history.append(row)
        tqdm.write(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  held-out nll {row['holdout_nll']:.4f}  "
                   f"({row['seconds']:.1f} s)")
        if on_epoch is not None:
            on_epoch(epoch, hold_scores, history)
    return history, hold_scores


def calibrate_threshold(scores: np.ndarray, quantile: float) -> dict:
    return {"threshold": float(np.quantile(scores, quantile)), "quantile": quantile, "n_images": int(len(scores)),
            "score_min": float(scores.min()), "score_median": float(np.median(scores)),
            "score_max": float(scores.max())}


def _parser() -> argparse.ArgumentParser:
    d, m = TrainConfig(), FlowConfig()
    p = argparse.ArgumentParser(prog="python -m train.fit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="MVTec-layout folder (uses train/good) or a folder of good images")
    p.add_argument("--out", required=True, help="model file to write (written atomically)")
    p.add_argument("--backbone", default=m.backbone, choices=sorted(BACKBONES), help="frozen feature extractor")
    p.add_argument("--backbone-weights", metavar="PATH",
                   help="ImageNet checkpoint (torchvision/timm) for resnet18 / wide_resnet50_2")
    p.add_argument("--input-size", type=int, default=m.input_size, help="images are resized to SIZE x SIZE")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training images")
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
    p.add_argument("--blur-sigma", type=float, default=m.blur_sigma, help="anomaly-map smoothing; 0 = off")
    p.add_argument("--fusion", default=m.fusion, choices=FUSIONS,
                   help="combine scales in units of held-out good pixels, or as FastFlow's mean probability")
    p.add_argument("--image-score-top", type=float, default=m.image_score_top, metavar="FRACTION",
                   help="image score = mean of this fraction of the map's highest pixels; 0 = the max")
    p.add_argument("--map-scales", default=m.map_scales, choices=MAP_SCALES,
                   help="the scales the anomaly map fuses: strides 4, 8, 16 (fine) or all four")
    p.add_argument("--image-scales", default=m.image_scales, choices=IMAGE_SCALES,
                   help="the map the image score reads: strides 16 + 32 (coarse), 32 only, or all four scales")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out split, initialisation and batch order")
    p.add_argument("--device", default=DEVICES[0], choices=DEVICES, help="where features and flow run")
    p.add_argument("--epoch-checkpoints", metavar="DIR",
                   help="also write DIR/epoch_NNN.pt after every epoch (to study stability)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("input_size", "epochs", "batch_size", "flow_steps", "altub_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.lr > 0 and args.base_lr > 0 and args.hidden_ratio > 0 and args.clamp > 0 and args.blur_sigma >= 0):
        raise UserError("--lr, --base-lr, --hidden-ratio and --clamp must be positive, --blur-sigma non-negative")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out takes a file name")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: folder does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this PyTorch")
    device = torch.device(args.device)

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, altub_every=args.altub_every,
                      base_lr=args.base_lr, lr_schedule=args.lr_schedule, seed=args.seed)
    try:  # FlowConfig checks its own fields; one place for the rules
        model_cfg = FlowConfig(backbone=args.backbone, input_size=args.input_size, flow_steps=args.flow_steps,
                               hidden_ratio=args.hidden_ratio, altub=not args.no_altub, blur_sigma=args.blur_sigma,
                               fusion=args.fusion, image_score_top=args.image_score_top, image_scales=args.image_scales,
                               map_scales=args.map_scales, clamp=args.clamp,
                               feature_pool=args.feature_pool)
    except ValueError as e:
        raise UserError(f"invalid option: {e}") from None
    paths = train_images(args.data)
    fit_paths, hold_paths = split_holdout(paths, cfg.holdout_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = FastFlow(model_cfg, create_backbone(args.backbone, args.backbone_weights)).to(device)
    print(f"lineflow: {len(fit_paths)} training + {len(hold_paths)} held-out good images from {args.data}; "
          f"{args.backbone} at {args.input_size}px, {'AltUB' if model_cfg.altub else 'fixed N(0, I)'} base")

    t_start = time.perf_counter()
    train_feats = extract_features(model, fit_paths, 16, device, "features (train)")
    hold_feats = extract_features(model, hold_paths, 16, device, "features (held-out)")
    t_features = time.perf_counter() - t_start
    print(f"features cached in {t_features:.1f} s ({sum(f.numel() * 4 for f in train_feats) / 2**20:.0f} MiB)")

    def meta(epoch: int, hold_scores: np.ndarray, history: list[dict]) -> dict:
        return {"threshold": calibrate_threshold(hold_scores, cfg.threshold_quantile),
                "train_config": asdict(cfg), "epoch": epoch, "history": history,
                "data": {"root": str(Path(args.data).resolve()), "n_train": len(fit_paths),
                         "n_holdout": len(hold_paths)},
                "timing": {"features_s": t_features, "total_s": time.perf_counter() - t_start}}

    on_epoch = None
    if args.epoch_checkpoints:
        ckpt_dir = Path(args.epoch_checkpoints)
        ckpt_dir.mkdir(parents=True, exist_ok=True)

        def on_epoch(epoch, hold_scores, history):
            save_model(ckpt_dir / f"epoch_{epoch:03d}.pt", model, meta(epoch, hold_scores, history))

    history, hold_scores = fit(model, train_feats, hold_feats, cfg, device, on_epoch)
    info = meta(cfg.epochs, hold_scores, history)
    if not math.isfinite(info["threshold"]["threshold"]):
        raise RuntimeError("held-out scores are not finite; training failed")
    save_model(out, model.cpu(), info)
    print(f"wrote {out}  (threshold {info['threshold']['threshold']:.4f} = {cfg.threshold_quantile:.0%} quantile "
          f"of {len(hold_paths)} held-out good images; {info['timing']['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    run_cli(main)
