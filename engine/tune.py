"""python -m engine.tune ENGINE --review DIR -o NEW.engine: set an engine's threshold again from labelled frames,
in seconds and without training.

The threshold a build carries was set at training time from a few dozen held-out good images; an operator's
labels come from the line itself. The new threshold is the lowest that rejects at most --max-rejected of
the good scores: the held-out ones the engine carries plus those of the frames labelled good
(engine.common.thresholds.max_rejected). Frames labelled defect never move it; the command says what it catches.

The new file is the same compiled graph (its sections byte for byte) under a new header: the new threshold and a
`provenance` record (engine.header.Provenance: the parent engine's id, the label counts and a hash of the
decisions, the rule). Each decision is {"frame": the SHA-256 of the frame file's bytes, "label"}; labels_sha256 is
the SHA-256 of their sorted list as canonical JSON (sorted keys, no spaces), so the same frames labelled the same
way give the same hash wherever they lie. The file is written atomically: -o may name ENGINE itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine import review_store
from engine.common.cli import HelpFormatter
from engine.common.errors import EXIT_BAD_INPUT, EXIT_OUTPUT_FAILED, UserError, run_cli
from engine.common.files import check_output
from engine.common.images import images_in, read_image
from engine.common.thresholds import MAX_REJECTED, max_rejected
from engine.format import read_engine_file, write_engine
from engine.header import EngineHeader, Provenance
from engine.runtime import Engine

__all__ = ["main", "LabelledFrame", "labelled_frames", "labels_sha256", "holdout_scores", "retune", "RULE"]

RULE = "max-rejected"


@dataclass(frozen=True)
class LabelledFrame:
    path: Path
    label: str  # "good" | "defect"
    sha256: str  # of the file's bytes: the decision's identity in labels_sha256


def _frame(path: Path, label: str) -> LabelledFrame:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"{path}: cannot read the labelled frame ({e.strerror or e})") from None
    return LabelledFrame(path, label, digest)


def _folder_images(option: str, folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{option} {folder}: no such folder")
    paths = images_in(folder)
    if not paths:
        raise UserError(f"{option} {folder}: no image files in it")
    return paths


def labelled_frames(review: Path | None, good: Path | None, defects: Path | None) -> list[tuple[Path, str]]:
    """(frame file, label) of every labelled frame the sources give: the review folder's labelled queue entries
    (engine.review_store, last label wins), then the images directly in the good and defect folders. A source that
    gives none is refused in one line."""
    out: list[tuple[Path, str]] = []
    if review is not None:
        if not review.is_dir():
            raise UserError(f"--review {review}: no such folder")
        entries = review_store.labelled_frames(review)
        if not entries:
            raise UserError(f"--review {review}: no labelled frames (label them with python -m engine.review "
                            f"{review} --good ID... or --defect ID...)")
        out += [(review / entry.frame, label) for entry, label in entries]
        skipped = {name: n for name, n in review_store.skipped_lines(review).items() if n}
        if skipped:
            print("note: skipped malformed lines: " + ", ".join(f"{n} of {review / name}" for name, n in
                                                                 skipped.items()), file=sys.stderr)
    for option, folder, label in (("--good", good, "good"), ("--defects", defects, "defect")):
        if folder is not None:
            out += [(p, label) for p in _folder_images(option, folder)]
    return out


def _distinct(frames: list[LabelledFrame]) -> list[LabelledFrame]:
    """One entry per distinct frame (the same bytes given twice count once); a frame labelled both ways is refused."""
    seen: dict[str, LabelledFrame] = {}
    for f in frames:
        first = seen.setdefault(f.sha256, f)
        if first.label != f.label:
            raise UserError(f"{f.path}: labelled {f.label}, but the same frame ({first.path}) is labelled "
                            f"{first.label}; correct one of them")
    return list(seen.values())


def labels_sha256(frames: list[LabelledFrame]) -> str:
    """The hash of the label decisions: the sorted list of {"frame": sha256, "label"} as canonical JSON."""
    decisions = sorted(({"frame": f.sha256, "label": f.label} for f in frames), key=lambda d: (d["frame"], d["label"]))
    return hashlib.sha256(json.dumps(decisions, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def holdout_scores(header: EngineHeader, path: Path) -> np.ndarray:
    """The held-out good scores the engine carries (header.model_threshold), or a one-line refusal."""
    scores = (header.model_threshold or {}).get("holdout_scores")
    if not isinstance(scores, list) or not scores or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in scores):
        raise UserError(f"{path}: the engine carries no held-out good scores (its model.pt predates them, or its "
                        "threshold was set by hand); rebuild it from a model.pt written by python -m train.fit")
    return np.asarray(scores, dtype=np.float64)


def _score(eng: Engine, frames: list[LabelledFrame]) -> np.ndarray:
    """Each frame's image score as engine.run gives it for an image file: decoded by engine.common.images.read_image,
    scored one frame a call (engine.run's default batch; a frame's score can move in the last bits with its
    batch-mates, and a threshold set at a good frame's score must pass that frame when the line scores it)."""
    scores = []
    for f in tqdm(frames, desc="scoring labelled frames", unit="frame", file=sys.stderr, leave=False):
        result = eng.score([read_image(f.path)], with_maps=False)[0]
        if result.error is not None:
            raise UserError(f"{f.path}: the engine gives it no score ({result.error})")
        scores.append(result.score)
    return np.asarray(scores, dtype=np.float64)


def _tally(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    flagged = scores > threshold
    return {"threshold": threshold, "good_rejected": int(flagged[labels == "good"].sum()),
            "defects_caught": int(flagged[labels == "defect"].sum())}


def retune(header: EngineHeader, parent_id: str, holdout: np.ndarray, frames: list[LabelledFrame],
           scores: np.ndarray, budget: float) -> tuple[EngineHeader, dict]:
    """The new header (the threshold by the rule from the held-out and the labelled good scores, provenance, the
    record of the retune in checks) and that record."""
    labels = np.array([f.label for f in frames])
    good = np.concatenate([holdout, scores[labels == "good"]])
    threshold = max_rejected(good, budget)
    record = {"good": int((labels == "good").sum()), "defect": int((labels == "defect").sum()),
              "held_out": len(holdout), "before": _tally(scores, labels, header.threshold),
              "after": _tally(scores, labels, threshold),
              "good_scores_rejected": int((good > threshold).sum())}
    provenance = Provenance(parent=parent_id, labels={"good": record["good"], "defect": record["defect"]},
                            labels_sha256=labels_sha256(frames), rule=RULE, max_rejected=float(budget),
                            good_scores=len(good), created=datetime.now(UTC).isoformat(timespec="seconds"),
                            parent_provenance=header.provenance)
    new = replace(header, threshold=threshold, provenance=provenance.to_dict(),
                  checks={**header.checks, "retune": record})
    return new, record


def _share(n: int, of: int) -> str:
    return f"{n} of {of} ({n / of:.1%})" if of else "-"


def _report(record: dict, budget: float, engine: Path) -> str:
    good, defect = record["good"], record["defect"]
    rows = [("", "threshold", "good rejected", "defects caught")]
    for name, key in ((f"before ({engine.name})", "before"), ("after", "after")):
        t = record[key]
        rows.append((name, f"{t['threshold']:.4f}", _share(t["good_rejected"], good),
                     _share(t["defects_caught"], defect)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in rows)
    n_good = record["held_out"] + good
    lines = [f"the lowest threshold that rejects at most {budget:.1%} of {n_good} good scores ({record['held_out']} "
             f"held-out, {good} labelled good): {record['after']['threshold']:.4f}, rejecting "
             f"{record['good_scores_rejected']} of them"]
    if defect:
        caught = record["after"]["defects_caught"]
        lines.append(f"it catches {caught} of the {defect} labelled defects ({caught / defect:.1%})")
    return "\n".join(lines) + f"\non the labelled frames ({good} good, {defect} defect):\n{table}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.tune", formatter_class=HelpFormatter,
        description="Set an engine's threshold again from labelled frames (seconds, no training). An image fails "
                    "when its score is above the threshold. The rule: the new threshold is the lowest that rejects "
                    "at most --max-rejected of the good scores (the held-out good scores the engine carries, and "
                    "those of the frames labelled good); frames labelled defect do not move it, and the command "
                    "says how many of them it catches. Prints good rejected and defects caught on the labelled "
                    "frames before and after. Writes a new engine file: the same compiled graph, a new header "
                    "recording the parent engine, the labels and the rule.",
        epilog=f"exit status: 0 written; {EXIT_BAD_INPUT} bad engine, labels or option (one line, nothing written); "
               f"{EXIT_OUTPUT_FAILED} the file could not be written (a file at -o stays as it was)")
    p.add_argument("engine", help="the engine file to retune (written by python -m engine.build or engine.tune)")
    p.add_argument("-o", "--out", required=True,
                   help="the new engine file (written atomically; it may be ENGINE itself)")
    p.add_argument("--review", metavar="DIR", help="a review folder (engine.run --review): its frames labelled "
                   "good or defect (python -m engine.review, or the live view's review page)")
    p.add_argument("--good", metavar="DIR", help="a folder of image files that are all good")
    p.add_argument("--defects", metavar="DIR", help="a folder of image files that are all defective")
    p.add_argument("--max-rejected", type=float, default=MAX_REJECTED, metavar="F",
                   help="the share of good scores the new threshold may reject, in [0, 1); 0: every good score "
                        "passes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    path = Path(args.engine)
    if args.review is None and args.good is None and args.defects is None:
        raise UserError("no labels: give --review DIR, --good DIR and/or --defects DIR")
    if not 0 <= args.max_rejected < 1:
        raise UserError(f"--max-rejected {args.max_rejected:g}: must be in [0, 1)")
    out = check_output("-o", args.out)
    review, good, defects = (None if d is None else Path(d) for d in (args.review, args.good, args.defects))
    pairs = labelled_frames(review, good, defects)
    taken = {p.resolve() for p, _ in pairs}
    if review is not None:
        taken |= {(review / name).resolve() for name in (review_store.QUEUE, review_store.LABELS)}
    if out.resolve() in taken:
        raise UserError(f"-o {out}: is one of the labelled frames or review files; give another file name")
    header, sections, parent_id = read_engine_file(path)
    holdout = holdout_scores(header, path)  # refused before any scoring
    frames = _distinct([_frame(p, label) for p, label in pairs])
    with Engine(path) as eng:
        if eng.engine_id != parent_id:
            raise UserError(f"{path}: the file changed while it was read; run again")
        scores = _score(eng, frames)
    new, record = retune(header, parent_id, holdout, frames, scores, args.max_rejected)
    write_engine(out, new, sections)
    _, _, new_id = read_engine_file(out)
    print(_report(record, args.max_rejected, path))
    print(f"wrote {out} (engine {new_id}, parent {parent_id}; {len(frames)} labelled frames scored, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
