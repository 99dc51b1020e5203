"""Issue 44's relearn target: relearning with the review half's good frames makes the later capture setting's good
frames in the evaluation half pass, the other good frames' median score rises by at most 5 %, and the old training
frames' median score by at most 5 %; at most 3 minutes on 2 cores.

    python research/line_loop_relearn.py MODEL.pt --data ../shared/data/bsd [--work DIR] [--json OUT] [--sweep]

Protocol (issue 44): the test set (test/good + test/<defect>) streamed in capture order (BSD: the file name's
yymmddhhmmss, then the name), split by alternating positions: even -> the review half, odd -> the evaluation half.
The review half's good frames (test/good only) are copied to WORK/review-good and the model relearns with them as
a user would, timed: `python -m train.fit --resume MODEL --add-good WORK/review-good --out WORK/relearned.pt`
(wall seconds, the process's CPU seconds and the load average beside them: on a shared box the wall time is the
box's, not the command's). Then, with each frame's features computed once, every model is scored on:
  - the old training frames (the model's own split, train/resume.py): median image score and mean NLL per dimension,
    before and after (the forgetting measure);
  - the held-out good frames (the model's and the new ones' held-out share): mean NLL per dimension, the label-free
    criterion the default settings are chosen by;
  - the evaluation half: the good frames of the later setting (--later-size) pass or not (score <= the model's own
    threshold); the other good frames' median score; defects caught and good frames rejected at each model's own
    threshold (read for the report, never for choosing).
--sweep also relearns in process with every setting of SWEEP (epochs, learning-rate factor, which frames are drawn;
cosine decay), --settings with those given, the features cached, and reports each. Prints a table; writes JSON
(--json: written after each setting, and the rows it holds are kept, not measured again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.common.images import images_in  # noqa: E402
from train import resume  # noqa: E402
from train.checkpoint import load_model  # noqa: E402
from train.data import image_sizes, size_weights  # noqa: E402
from train.fit import TrainConfig, extract_features, fit, score_cached  # noqa: E402
from train.tiles import FrameTiles, flow_frames  # noqa: E402

# (epochs, learning-rate factor, draw), cosine decay: every setting in docs/lab/line-loop-rounds.md (round 1)
SWEEP = [(e, 1.0, "frames") for e in (1, 2, 4)] + [(e, f, "frames") for f in (0.3, 0.1) for e in (1, 2, 3, 4)] + [
    (2, 0.3, "sizes"), (2, 0.3, "added0.5"), (2, 1.0, "sizes"), (3, 0.3, "sizes"), (3, 0.3, "allnew"),
    (3, 0.3, "sizes+allnew"), (3, 0.1, "sizes"), (2, 0.3, "added0.25")]


def capture_time(p: Path) -> str:
    return p.name.split("_")[1] if p.name.count("_") >= 2 else p.name  # BSD: 01_<yymmddhhmmss>_..., else the name


def stream_halves(data: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """The test set in capture order, (path, label 0 good / 1 defect), split by position: (review, evaluation)."""
    frames = [(p, int(folder.name != "good")) for folder in sorted((data / "test").iterdir()) if folder.is_dir()
              for p in images_in(folder)]
    frames.sort(key=lambda f: (capture_time(f[0]), f[0].name))
    return frames[0::2], frames[1::2]


def timed_cli(model: Path, added: Path, out: Path) -> dict:
    """train.fit --resume as a user runs it: wall and CPU seconds, the load average around it, its last lines."""
    cmd = [sys.executable, "-m", "train.fit", "--resume", str(model), "--add-good", str(added), "--out", str(out)]
    cpu0, load0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    print(proc.stdout, end="")
    return {"command": " ".join(["python", *cmd[1:]]), "wall_s": wall,
            "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
            "load_before": load0, "load_after": os.getloadavg()[0], "stdout": proc.stdout.splitlines()}


def scores(model, feats) -> tuple[np.ndarray, np.ndarray]:
    """(NLL per dimension, image score) per frame of cached (features, frames)."""
    model.eval()
    return score_cached(model, flow_frames(model, *feats, torch.device("cpu")))


def readings(model, threshold: float, feats: dict, groups: dict) -> dict:
    """One model's numbers on the cached frames (see the module's docstring)."""
    train_nll, train_score = scores(model, feats["old_train"])
    hold_nll, _ = scores(model, feats["held_out"])
    _, ev = scores(model, feats["evaluation"])
    good, defect, later = groups["good"], groups["defect"], groups["later"]
    n_old = groups["n_old_held_out"]
    return {"threshold": threshold, "old_train_median_score": float(np.median(train_score)),
            "old_train_nll": float(train_nll.mean()), "held_out_nll": float(hold_nll.mean()),
            "held_out_nll_old": float(hold_nll[:n_old].mean()),
            "held_out_nll_new": float(hold_nll[n_old:].mean()) if len(hold_nll) > n_old else None,
            "eval_other_good_median_score": float(np.median(ev[good & ~later])),
            "eval_later_good_scores": [float(v) for v in ev[good & later]],
            "eval_later_good_passed": int((ev[good & later] <= threshold).sum()),
            "eval_defects_caught": float((ev[defect] > threshold).mean()),
            "eval_good_rejected": float((ev[good] > threshold).mean())}


def cached_features(model, cache: Path, groups: dict[str, list[Path]]) -> dict:
    """Per group, the frozen backbone's features of its frames and where their tiles lie, computed once into `cache`
    (tensors and plain lists: read back with weights_only)."""
    if cache.exists():
        raw = torch.load(cache, weights_only=True)
        return {k: (f, [FrameTiles(tuple(hw), tuple(map(tuple, starts))) for hw, starts in where])
                for k, (f, where) in raw.items()}
    feats = {k: extract_features(model, paths, torch.device("cpu"), k) for k, paths in groups.items()}
    torch.save({k: (f, [[list(w.scaled_hw), [list(s) for s in w.starts]] for w in where])
                for k, (f, where) in feats.items()}, cache)
    return feats


def training_set(feats: dict, draw: str, sizes: dict) -> tuple:
    """The relearning's (training features, held-out features and frames, draw weights per tile) for `draw`, flags
    joined by "+": "frames" each frame once an epoch; "sizes" by count(its size)^-1/2 (train.data.size_weights,
    old and added frames); "addedF" the added frames take F of the draws; "allnew" no added frame held out."""
    flags = set(draw.split("+"))
    (old_f, old_fr), (add_f, add_fr), (hold_f, hold_fr) = feats["old_train"], feats["added_train"], feats["held_out"]
    n_hold = sizes["n_old_held_out"]
    train_f, train_fr, train_sizes = [old_f, add_f], old_fr + add_fr, sizes["old_train"] + sizes["added_train"]
    if "allnew" in flags:  # the added held-out frames train too; the model's own held-out frames set the threshold
        cut = sum(len(w.starts) for w in hold_fr[:n_hold])
        train_f, train_fr = train_f + [[f[cut:] for f in hold_f]], train_fr + hold_fr[n_hold:]
        train_sizes = train_sizes + sizes["held_out"][n_hold:]
        hold_f, hold_fr = [f[:cut] for f in hold_f], hold_fr[:n_hold]
    train_f = [torch.cat(parts) for parts in zip(*train_f)]
    n_old, n_new = len(old_fr), len(train_fr) - len(old_fr)
    per_frame = None
    if "sizes" in flags:
        per_frame = size_weights(train_sizes)
    share = next((float(f.removeprefix("added")) for f in flags if f.startswith("added")), None)
    if share is not None:
        per_frame = np.array([(1 - share) / n_old] * n_old + [share / n_new] * n_new)
    weights = None if per_frame is None else torch.tensor(
        [w for w, fr in zip(per_frame.tolist(), train_fr) for _ in fr.starts], dtype=torch.float64)
    return train_f, (hold_f, hold_fr), weights


def relearned_in_process(model_path: Path, feats: dict, epochs: int, factor: float, draw: str, sizes: dict) -> tuple:
    """train/resume.py's run on the cached features: (model, threshold, seconds of training, history)."""
    model, meta = load_model(model_path)
    cfg = TrainConfig(**meta.train_config)
    cfg = replace(cfg, epochs=epochs, lr=cfg.lr * factor, base_lr=cfg.base_lr * factor,
                  lr_schedule=resume.RESUME_SCHEDULE)
    train_f, held_out, weights = training_set(feats, draw, sizes)
    t0 = time.perf_counter()
    history, hold_scores = fit(model, train_f, *held_out, cfg, torch.device("cpu"), weights=weights)
    return model, resume.rederive_threshold(meta, hold_scores)["threshold"], time.perf_counter() - t0, history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True, help="MVTec layout; the model's training folder or a copy")
    p.add_argument("--work", type=Path, default=Path("/tmp/lineflow-relearn"))
    p.add_argument("--later-size", default="1540x645", help="WxH of the later capture setting's frames")
    p.add_argument("--sweep", action="store_true", help="also every setting of SWEEP, in process")
    p.add_argument("--settings", help="instead of SWEEP: EPOCHSxFACTOR,... (e.g. 1x0.1,2x0.1)")
    p.add_argument("--no-cli", action="store_true", help="skip the timed command (reuse WORK/relearned.pt)")
    p.add_argument("--json", type=Path, help="written after each setting; the rows it holds already are kept, "
                   "not measured again")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = args.work / args.model.stem
    added = work / "review-good"
    review, evaluation = stream_halves(args.data)
    if added.exists():
        shutil.rmtree(added)
    added.mkdir(parents=True)
    for path, label in review:
        if label == 0:
            shutil.copy2(path, added / path.name)
    report = {"model": str(args.model), "data": str(args.data), "review_frames": len(review),
              "review_good_added": sum(1 for _, label in review if label == 0), "evaluation_frames": len(evaluation)}

    out = work / "relearned.pt"
    if not args.no_cli:
        report["cli"] = timed_cli(args.model, added, out)
        print(f"relearned in {report['cli']['wall_s']:.0f} s wall, {report['cli']['cpu_s']:.0f} s CPU (load average "
              f"{report['cli']['load_before']:.1f} before, {report['cli']['load_after']:.1f} after)")

    parent, meta = load_model(args.model)
    _, fit_paths, hold_paths = resume.training_frames(args.model, meta, str(args.data))
    split = meta.train_config["holdout_fraction"], meta.train_config["seed"]
    add_fit, add_hold = resume.added_split(images_in(added), *split)
    eval_paths = [path for path, _ in evaluation]
    labels = np.array([label for _, label in evaluation])
    w, h = map(int, args.later_size.lower().split("x"))
    later = np.array([size == (h, w) for size in image_sizes(eval_paths)])
    groups = {"good": labels == 0, "defect": labels == 1, "later": later, "n_old_held_out": len(hold_paths)}
    report["evaluation_good"] = {"later": int((groups["good"] & later).sum()),
                                 "other": int((groups["good"] & ~later).sum()), "defects": int(groups["defect"].sum())}

    feats = cached_features(parent, work / "features.pt", {
        "old_train": fit_paths, "added_train": add_fit, "held_out": hold_paths + add_hold, "evaluation": eval_paths})
    sizes = {"old_train": image_sizes(fit_paths), "added_train": image_sizes(add_fit),
             "held_out": image_sizes(hold_paths + add_hold), "n_old_held_out": len(hold_paths)}

    done = json.loads(args.json.read_text())["rows"] if args.json and args.json.exists() else {}
    rows = {"before": done.get("before") or readings(parent, meta.threshold.threshold, feats, groups)}
    if out.exists() and ("cli" in report or "relearned (command)" not in done):
        relearned, new_meta = load_model(out)
        rows["relearned (command)"] = readings(relearned, new_meta.threshold.threshold, feats, groups)
    rows.update({name: row for name, row in done.items() if name not in rows})
    settings = [(resume.RESUME_EPOCHS, resume.RESUME_LR_FACTOR, "frames")]
    if args.settings:
        settings = [(int(e), float(f.split(":")[0]), (f.split(":") + ["frames"])[1])
                    for e, f in (s.split("x", 1) for s in args.settings.split(","))]
    elif args.sweep:
        settings = SWEEP
    for epochs, factor, draw in settings:
        name = f"{epochs} epochs, lr x{factor:g}" + ("" if draw == "frames" else f", draw {draw}")
        if name in rows:
            continue
        model, threshold, seconds, history = relearned_in_process(args.model, feats, epochs, factor, draw, sizes)
        rows[name] = {**readings(model, threshold, feats, groups), "train_s": seconds,
                      "held_out_nll_by_epoch": [row["holdout_nll"] for row in history]}
        print(f"{name}: held-out nll {rows[name]['held_out_nll']:.4f}, old training median score "
              f"{rows[name]['old_train_median_score']:.4f} ({seconds:.0f} s)", flush=True)
        if args.json:
            args.json.write_text(json.dumps({**report, "rows": rows}, indent=1))
    report["default"] = f"{resume.RESUME_EPOCHS} epochs, lr x{resume.RESUME_LR_FACTOR:g}"
    base = rows["before"]
    for row in rows.values():
        row["old_train_rise"] = row["old_train_median_score"] / base["old_train_median_score"] - 1
        row["eval_other_good_rise"] = row["eval_other_good_median_score"] / base["eval_other_good_median_score"] - 1
    report["rows"] = rows
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_table(report: dict) -> None:
    eg = report["evaluation_good"]
    print(f"\n{report['model']}: {report['review_good_added']} good frames added (review half); evaluation half "
          f"{eg['later']} later-setting good, {eg['other']} other good, {eg['defects']} defects")
    print("| model | threshold | old training median score (rise) | old training nll | held-out nll (old / new) | "
          "eval other good median (rise) | eval later-setting good passed (scores) | eval defects caught / good "
          "rejected |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in report["rows"].items():
        new = "" if r["held_out_nll_new"] is None else f" / {r['held_out_nll_new']:.4f}"
        name += " (default)" if name == report.get("default") else ""
        print(f"| {name} | {r['threshold']:.4f} | {r['old_train_median_score']:.4f} ({r['old_train_rise']:+.1%}) | "
              f"{r['old_train_nll']:.4f} | {r['held_out_nll']:.4f} ({r['held_out_nll_old']:.4f}{new}) | "
              f"{r['eval_other_good_median_score']:.4f} ({r['eval_other_good_rise']:+.1%}) | "
              f"{r['eval_later_good_passed']}/{len(r['eval_later_good_scores'])} "
              f"({', '.join(f'{v:.3f}' for v in r['eval_later_good_scores'])}) | "
              f"{r['eval_defects_caught']:.1%} / {r['eval_good_rejected']:.1%} |")
    if "cli" in report:
        c = report["cli"]
        print(f"\n`{c['command']}`: {c['wall_s']:.0f} s wall, {c['cpu_s']:.0f} s CPU, load average "
              f"{c['load_before']:.1f} -> {c['load_after']:.1f}")


if __name__ == "__main__":
    main()
