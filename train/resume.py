"""python -m train.fit --resume model.pt --add-good DIR --out new.pt: relearn a model with new good frames.

A line changes (a new capture setting, lighting, material) and its good frames start to fail. Rather than a full
refit, the flow continues from model.pt's weights and AltUB base on the frames it was trained on plus the new good
ones, with the same frozen backbone and features cached for the run (train.fit.extract_features), for a few epochs;
the threshold is then re-derived by the model's own rule (engine/common/thresholds.py) on its held-out good frames.

Which frames. model.pt records its training folder and train.fit's split (ModelMeta.data; train_config's
holdout_fraction and seed): the split is drawn again and checked against the recorded counts, so the threshold is
re-derived on the same held-out frames. The new frames are split by the same rule (train.fit.split_holdout at the
model's fraction and seed) where it holds out at least one (round(fraction x n) >= 1: 5 or more new frames at 10 %),
and their held-out share joins the held-out set: the new threshold also reads the conditions the line has now.
Frames added by earlier resumes (ModelMeta.resumed) are read again from their folders and split the same way.

The optimiser restarts: model.pt holds no optimiser state (and Adam's moments at the end of an annealed run belong to
a learning rate near zero). A fresh Adam's first steps move every weight by about its learning rate, which at the
model's own rates undoes much of the fit, so the resumed run starts at RESUME_LR_FACTOR x the model's rates, flow and
base, and decays them to 0 along a half cosine over RESUME_EPOCHS epochs: the setting with the best held-out
likelihood of good frames among those that keep the old training frames' median score within 5 % and the run within
3 minutes on 2 cores; no defect labels (docs/line-loop.md, "Relearn": every setting measured).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from engine.common.errors import UserError
from engine.common.files import check_output
from engine.common.images import images_in
from engine.common.thresholds import THRESHOLD_RULES, from_good
from train.checkpoint import DataInfo, ModelMeta, Resume, Threshold, load_model, save_model
from train.data import image_sizes, train_images
from train.fit import TrainConfig, _draw_weights, extract_features, fit, score_cached, split_holdout
from train.input_stats import input_stats
from train.schedule import fastest_precision, fastest_step
from train.tiles import flow_frames

__all__ = ["RESUME_EPOCHS", "RESUME_LR_FACTOR", "RESUME_SCHEDULE", "RESUME_OPTIONS", "given_options",
           "added_split", "training_frames", "resume_config", "threshold_rule", "rederive_threshold", "main"]

RESUME_EPOCHS = 3  # passes over old + new training frames (docs/line-loop.md, "Relearn": the settings measured)
RESUME_LR_FACTOR = 0.1  # the resumed run's learning rates, flow and base, as a share of the model's own
RESUME_SCHEDULE = "cosine"
# the options --resume takes; every other one would change the model, its split or its threshold rule
RESUME_OPTIONS = ("resume", "add_good", "data", "out", "epochs", "batch_size", "lr", "base_lr", "lr_schedule",
                  "altub_every", "balance_sizes", "device", "train_precision", "train_step", "no_early_stop")


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options (argparse dests) the command line names, whatever their values (abbreviated too): `parser`, a
    fresh one, parses again with every default suppressed."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def added_split(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """New good frames -> (train, held-out): train.fit's split where it holds out at least one, else all train."""
    if round(fraction * len(paths)) < 1:
        return sorted(paths), []
    return split_holdout(paths, fraction, seed)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _added_frames(folder: Path) -> list[Path]:
    paths = images_in(folder) if folder.is_dir() else None
    if not paths:
        raise UserError(f"{folder}: --add-good needs a folder of good images (none found)")
    return paths


def training_frames(model_path: Path, meta: ModelMeta, data: str | None) -> tuple[str, list[Path], list[Path]]:
    """The model's own training folder (or `data`, where its frames are now) and frames earlier resumes added ->
    (root, train, held-out), the split as the model was trained; UserError where it cannot be recovered."""
    if meta.data is None or not meta.train_config:
        raise UserError(f"{model_path}: records no training folder and split (not written by train.fit): "
                        "cannot resume it; train a model with python -m train.fit")
    root = data or meta.data.root
    if not Path(root).is_dir():
        raise UserError(f"{model_path}: its training folder {root} is not here (trained elsewhere?); "
                        "--data DIR: where its training frames are now")
    paths = train_images(root)
    try:
        cfg = TrainConfig(**meta.train_config)
    except TypeError:
        raise UserError(f"{model_path}: its training settings are not this lineflow's ({sorted(meta.train_config)}): "
                        "cannot resume it; train a model with python -m train.fit") from None
    if len(paths) != meta.data.n_train + meta.data.n_holdout:
        raise UserError(f"{root}: {len(paths)} good training images, but {model_path} was trained on "
                        f"{meta.data.n_train + meta.data.n_holdout}: its held-out split cannot be kept; "
                        "--data DIR: the training frames as they were")
    fit_paths, hold_paths = split_holdout(paths, cfg.holdout_fraction, cfg.seed)
    for earlier in meta.resumed or ():
        added = Path(earlier.added)
        found = images_in(added) if added.is_dir() else []
        if len(found) != earlier.n_added:
            raise UserError(f"{model_path}: the {earlier.n_added} good frames an earlier --resume added from "
                            f"{added} are not there as they were (found {len(found)}): they are part of its training")
        more_fit, more_hold = added_split(found, cfg.holdout_fraction, cfg.seed)
        fit_paths, hold_paths = fit_paths + more_fit, hold_paths + more_hold
    return str(Path(root).resolve()), fit_paths, hold_paths


def resume_config(parent: dict, given: set[str], args: argparse.Namespace) -> TrainConfig:
    """The resumed run's settings: the model's own (split, seed, threshold rule, batch size, AltUB cadence), its
    learning rates x RESUME_LR_FACTOR decaying along RESUME_SCHEDULE over RESUME_EPOCHS, at this machine's fastest
    training precision and step (not the parent's: it may have been trained elsewhere); options given override."""
    cfg = TrainConfig(**parent)
    device = torch.device(args.device)
    precision = args.train_precision if args.train_precision != "auto" else fastest_precision(device)[0]
    step = args.train_step if args.train_step != "auto" else fastest_step(device, args.train_precision)[0]
    cfg = replace(cfg, epochs=RESUME_EPOCHS, lr=cfg.lr * RESUME_LR_FACTOR, base_lr=cfg.base_lr * RESUME_LR_FACTOR,
                  lr_schedule=RESUME_SCHEDULE, precision=precision, step=step, early_stop=not args.no_early_stop)
    own = {name: getattr(args, name) for name in ("epochs", "batch_size", "lr", "base_lr", "lr_schedule",
                                                  "altub_every") if name in given}
    if "balance_sizes" in given:
        own["balance_sizes"] = True
    return replace(cfg, **own)


def threshold_rule(meta: ModelMeta) -> str:
    """The model's own label-free rule: its threshold's, or (a threshold set from defect images) train.fit's."""
    rule = meta.threshold.rule if meta.threshold else None
    return rule if rule in THRESHOLD_RULES else TrainConfig(**meta.train_config).threshold_rule


def rederive_threshold(meta: ModelMeta, hold_scores: np.ndarray) -> dict:
    """The threshold by the model's own rule (its recorded spreads or quantile) from held-out good scores."""
    rule = threshold_rule(meta)
    t = meta.threshold.to_dict() if meta.threshold and meta.threshold.rule == rule else {}
    return from_good(hold_scores, rule, **{k: t[k] for k in ("spreads", "quantile") if t.get(k) is not None})


def _check_options(given: set[str]) -> None:
    refused = sorted(given - set(RESUME_OPTIONS))
    if refused:
        names = ", ".join(f"--{n.replace('_', '-')}" for n in refused)
        raise UserError(f"{names}: --resume keeps the model as it is (backbone, input, flow, scoring, split, seed, "
                        "threshold rule); with --resume only " + ", ".join(f"--{n.replace('_', '-')}"
                                                                          for n in RESUME_OPTIONS[1:]) + " apply")
    if "add_good" not in given:
        raise UserError("--resume needs --add-good DIR: the folder of new good frames to relearn with")


def _medians(scores: np.ndarray, n_old: int) -> str:
    old, new = scores[:n_old], scores[n_old:]
    return f"{np.median(old):.4f}" + (f" / {np.median(new):.4f}" if len(new) else "")


def main(args: argparse.Namespace, given: set[str]) -> int:
    """train.fit's command with --resume (args: train.fit's parsed options; given: those the user named)."""
    if "resume" not in given:
        raise UserError("--add-good needs --resume MODEL: the model to relearn")
    _check_options(given)
    for name in ("epochs", "batch_size", "altub_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.lr > 0 and args.base_lr > 0):
        raise UserError("--lr and --base-lr must be positive")
    out = check_output("--out", args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this PyTorch")
    device = torch.device(args.device)
    parent_path = Path(args.resume)
    model, meta = load_model(parent_path)
    parent_sha256 = _sha256(parent_path)
    root, fit_paths, hold_paths = training_frames(parent_path, meta, args.data)
    added = Path(args.add_good)
    if any(Path(earlier.added) == added.resolve() for earlier in meta.resumed or ()):
        raise UserError(f"{added}: an earlier --resume of {parent_path} added these frames already (they are part of "
                        "its training); --add-good takes a folder of frames not added before")
    add_fit, add_hold = added_split(_added_frames(added), meta.train_config["holdout_fraction"],
                                    meta.train_config["seed"])
    cfg = resume_config(meta.train_config, given, args)
    rule = threshold_rule(meta)
    old_threshold = meta.threshold.threshold if meta.threshold else None
    was = "none" if old_threshold is None else f"{old_threshold:.4f}"
    print(f"lineflow: resuming {parent_path} (sha256 {parent_sha256[:12]}, {meta.epoch} epochs) on {len(fit_paths)} "
          f"training + {len(hold_paths)} held-out good frames from {root} and {len(add_fit)} + {len(add_hold)} new "
          f"from {added}; {cfg.epochs} epochs at lr {cfg.lr:g} (base {cfg.base_lr:g}, {cfg.lr_schedule}), "
          f"optimiser restarted, training precision {cfg.precision}, {cfg.step} step")
    if meta.threshold and meta.threshold.rule not in THRESHOLD_RULES:
        print(f"note: {parent_path}'s threshold came from rule {meta.threshold.rule!r}; the resumed model's comes "
              f"from the held-out good frames by rule {rule!r} (retune it with labelled defects on the engine)")

    t_start = time.perf_counter()
    model = model.to(device)
    train_feats, train_frames = extract_features(model, fit_paths + add_fit, device, "features (train)")
    hold_feats, hold_frames = extract_features(model, hold_paths + add_hold, device, "features (held-out)")
    t_features = time.perf_counter() - t_start
    model.eval()
    before_nll, before = score_cached(model, flow_frames(model, hold_feats, hold_frames, device))
    first = sum(len(w.starts) for w in train_frames[:len(fit_paths)])  # the added frames' tiles follow the old ones'
    added_feats = [f[first:] for f in train_feats], train_frames[len(fit_paths):]
    added_before = score_cached(model, flow_frames(model, *added_feats, device))[1]
    print(f"features cached in {t_features:.1f} s; held-out good frames' median score (old / new) "
          f"{_medians(before, len(hold_paths))}, nll {before_nll.mean():.4f}, threshold {was}")

    weights = _draw_weights(image_sizes(fit_paths + add_fit), train_frames) if cfg.balance_sizes else None
    history, hold_scores = fit(model, train_feats, hold_feats, hold_frames, cfg, device, weights=weights)
    threshold = rederive_threshold(meta, hold_scores)
    added_after = score_cached(model, flow_frames(model, *added_feats, device))[1]
    if not math.isfinite(threshold["threshold"]):
        raise RuntimeError("held-out scores are not finite; training failed")
    # drift alarms then compare the line with every frame the model now takes as good, the new ones too
    frame_stats = input_stats(fit_paths + hold_paths + add_fit + add_hold)
    seconds = time.perf_counter() - t_start
    n_before = meta.epoch or 0
    record = Resume(parent_sha256, str(added.resolve()), len(add_fit) + len(add_hold), len(add_hold), len(history),
                    old_threshold, asdict(cfg), seconds)
    rows = [{**row, "epoch": n_before + row["epoch"], "resume": len(meta.resumed or ()) + 1} for row in history]
    info = replace(meta, threshold=Threshold.from_dict(threshold), epoch=n_before + len(history),
                   history=(meta.history or []) + rows,
                   data=DataInfo(root, meta.data.n_train, meta.data.n_holdout),
                   input_stats=frame_stats, resumed=list(meta.resumed or ()) + [record])
    save_model(out, model.cpu(), info)
    print(f"held-out good frames' median score (old / new) {_medians(before, len(hold_paths))} before, "
          f"{_medians(hold_scores, len(hold_paths))} after; nll {before_nll.mean():.4f} -> "
          f"{history[-1]['holdout_nll']:.4f}")
    if old_threshold is not None:  # the label-free reading of what relearning did for the frames it was given
        print(f"new good frames trained on: {int((added_before > old_threshold).sum())} of {len(add_fit)} above the "
              f"threshold before (median score {np.median(added_before):.4f}), "
              f"{int((added_after > threshold['threshold']).sum())} after ({np.median(added_after):.4f})")
    print(f"wrote {out}  (threshold {was} -> {threshold['threshold']:.4f}, rule {rule}, "
          f"{len(hold_scores)} held-out good frames; {seconds:.0f} s in all)")
    return 0
