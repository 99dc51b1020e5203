"""python -m engine.review DIR --good ID... | --defect ID... | --list: label the review queue without a browser.

DIR is a folder that engine.run --review DIR fills (engine/review_store.py: queue.jsonl, labels.jsonl). Labels are
appended to DIR/labels.jsonl, one line per decision; the last one for a frame wins, so a label is changed by
giving another. The live view's review page (engine.run --view ... --review DIR) writes the same file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.common.cli import HelpFormatter
from engine.common.errors import EXIT_BAD_INPUT, UserError, run_cli
from engine.review_store import LABELS, QUEUE, append_labels, read_labels, read_queue, skipped_lines

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.review", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog=f"exit status: 0 done; {EXIT_BAD_INPUT} bad folder or an id not in the queue "
                                "(one line, nothing written)")
    p.add_argument("folder", metavar="DIR", help="the review folder (engine.run --review DIR)")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--good", nargs="+", metavar="ID", help="label these queued frames good")
    action.add_argument("--defect", nargs="+", metavar="ID", help="label these queued frames defect")
    action.add_argument("--list", action="store_true", help="print the queue with its labels: id, index, source, "
                        "score, verdict, label")
    p.add_argument("--who", default=os.environ.get("USER") or None, help="who labels (default: $USER; none if unset)")
    return p


def _table(folder: Path) -> list[str]:
    labels = read_labels(folder)
    rows = [("id", "index", "source", "score", "verdict", "label")]
    rows += [(e.id, str(e.index), e.source, f"{e.score:.4f}", "flagged" if e.is_anomalous else "passed",
              labels[e.id].label if e.id in labels else "-") for e in read_queue(folder)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    folder = Path(args.folder)
    if not (folder / QUEUE).is_file():
        raise UserError(f"{folder}: no {QUEUE} here (made by python -m engine.run ... --review {folder})")
    if args.list:
        for line in _table(folder):
            print(line)
        skipped = {name: n for name, n in skipped_lines(folder).items() if n}
        for name, n in skipped.items():
            print(f"note: {n} malformed lines of {folder / name} skipped", file=sys.stderr)
        return 0
    label, ids = ("good", args.good) if args.good else ("defect", args.defect)
    written = append_labels(folder, ids, label, args.who)
    print(f"{len(written)} labelled {label} -> {folder / LABELS}")
    return 0


if __name__ == "__main__":
    run_cli(main)
