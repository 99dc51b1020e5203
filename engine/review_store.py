"""The review folder: what engine.run --review keeps, what operators label, what engine.tune reads.

    DIR/queue.jsonl    one JSON object per kept frame (QueueEntry): id, the run's own JSONL fields (index, source,
                       timestamp, score, is_anomalous, engine), the threshold it was judged against, and the file
                       names of its frame (lossless PNG) and overlay (PNG), both inside DIR
    DIR/labels.jsonl   append-only, one line per decision (Label): id, label "good" | "defect", when (ISO 8601 UTC),
                       who (or null); the last line for an id wins

Both files are logs that a crash, a second writer or a hand edit may leave with a bad line: readers skip a
malformed line and count it (`skipped_lines`), never fail on it. The writer of the queue (engine.sinks.review)
appends whole lines and rewrites the file atomically when it evicts; labels are appended under a file lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from engine.common.errors import OutputError, UserError, os_reason
from engine.common.files import atomic_write

__all__ = ["QUEUE", "LABELS", "LABEL_VALUES", "ID_PATTERN", "QueueEntry", "Label", "new_id", "frame_name",
           "overlay_name", "read_queue", "read_labels", "skipped_lines", "append_labels", "labelled_frames",
           "append_queue", "queue_line", "rewrite_queue"]

QUEUE = "queue.jsonl"
LABELS = "labels.jsonl"
LABEL_VALUES = ("good", "defect")
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
FILE_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.png")  # a plain file name inside DIR, never a path

LabelValue = Literal["good", "defect"]


@dataclass(frozen=True)
class QueueEntry:
    """One kept frame: a line of queue.jsonl."""

    id: str
    index: int
    source: str
    timestamp: float | None
    score: float
    is_anomalous: bool
    engine: str | None
    threshold: float | None
    frame: str  # file name inside DIR: the frame as it came, lossless PNG
    overlay: str  # file name inside DIR: the heat-map overlay, PNG

    @classmethod
    def from_json(cls, d) -> QueueEntry:
        """A queue line's object -> QueueEntry; ValueError when a field is missing or of the wrong kind (keys a
        newer lineflow may add are ignored)."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if not isinstance(d.get("id"), str) or not ID_PATTERN.fullmatch(d["id"]):
            raise ValueError(f"bad id {d.get('id')!r}")
        for key in ("frame", "overlay"):
            if not isinstance(d.get(key), str) or not FILE_PATTERN.fullmatch(d[key]):
                raise ValueError(f"bad {key} file name {d.get(key)!r}")
        if not isinstance(d.get("index"), int) or isinstance(d["index"], bool):
            raise ValueError("bad index")
        if not isinstance(d.get("is_anomalous"), bool):
            raise ValueError("bad is_anomalous")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not number(d.get("score")) or any(d.get(k) is not None and not number(d[k])
                                             for k in ("timestamp", "threshold")):
            raise ValueError("bad score, timestamp or threshold")
        if not isinstance(d.get("source"), str) or not (d.get("engine") is None or isinstance(d["engine"], str)):
            raise ValueError("bad source or engine")
        return cls(id=d["id"], index=d["index"], source=d["source"], timestamp=d.get("timestamp"),
                   score=float(d["score"]), is_anomalous=d["is_anomalous"], engine=d.get("engine"),
                   threshold=d.get("threshold"), frame=d["frame"], overlay=d["overlay"])


@dataclass(frozen=True)
class Label:
    """One decision: a line of labels.jsonl."""

    id: str
    label: LabelValue
    when: str  # ISO 8601, UTC
    who: str | None

    @classmethod
    def from_json(cls, d) -> Label:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if not isinstance(d.get("id"), str) or not ID_PATTERN.fullmatch(d["id"]):
            raise ValueError(f"bad id {d.get('id')!r}")
        if d.get("label") not in LABEL_VALUES:
            raise ValueError(f"bad label {d.get('label')!r}")
        if not isinstance(d.get("when"), str) or not (d.get("who") is None or isinstance(d["who"], str)):
            raise ValueError("bad when or who")
        return cls(id=d["id"], label=d["label"], when=d["when"], who=d.get("who"))


def new_id(index: int, taken: set[str]) -> str:
    """A fresh id for the frame at `index`: '000123-a1b2c3' (the index, then a random tail, unique in `taken`)."""
    while True:
        candidate = f"{index:06d}-{secrets.token_hex(3)}"
        if candidate not in taken:
            return candidate


def frame_name(entry_id: str) -> str:
    return f"{entry_id}.frame.png"


def overlay_name(entry_id: str) -> str:
    return f"{entry_id}.overlay.png"


def _read_lines(path: Path, parse) -> tuple[list, int]:
    """(parsed objects, malformed lines skipped) of a JSONL file; a missing file is empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        raise UserError(f"{path}: cannot read ({os_reason(e)})") from None
    out, skipped = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            out.append(parse(json.loads(line)))
        except (ValueError, TypeError, RecursionError):  # bad JSON or bad fields: a log line to skip, counted
            skipped += 1
    return out, skipped


def read_queue(folder: str | Path) -> list[QueueEntry]:
    """The queue in the order frames were kept (oldest first). Malformed lines are skipped (skipped_lines counts
    them); a later line with an id seen before is skipped too (ids are unique)."""
    entries, _ = _read_lines(Path(folder) / QUEUE, QueueEntry.from_json)
    unique: dict[str, QueueEntry] = {}
    for e in entries:
        unique.setdefault(e.id, e)
    return list(unique.values())


def read_labels(folder: str | Path) -> dict[str, Label]:
    """Each id's label: the last line for an id wins. Malformed lines are skipped (skipped_lines counts them)."""
    labels, _ = _read_lines(Path(folder) / LABELS, Label.from_json)
    return {label.id: label for label in labels}


def skipped_lines(folder: str | Path) -> dict[str, int]:
    """Malformed lines that read_queue and read_labels skip, per file: {'queue.jsonl': N, 'labels.jsonl': M}."""
    folder = Path(folder)
    return {QUEUE: _read_lines(folder / QUEUE, QueueEntry.from_json)[1],
            LABELS: _read_lines(folder / LABELS, Label.from_json)[1]}


def append_labels(folder: str | Path, ids: list[str], label: str, who: str | None) -> list[Label]:
    """Append one line per id, all in one write under an exclusive lock on labels.jsonl (concurrent labellers
    never interleave). An id not in the queue, or a label other than good/defect, is refused in one line
    (UserError) and nothing is written."""
    folder = Path(folder)
    if label not in LABEL_VALUES:
        raise UserError(f"label {label!r}: expected one of {', '.join(LABEL_VALUES)}")
    known = {e.id for e in read_queue(folder)}
    unknown = [i for i in ids if i not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(f"{folder / QUEUE}: no queued frame with id {shown}; nothing written")
    when = datetime.now(UTC).isoformat(timespec="seconds")
    labels = [Label(id=i, label=label, when=when, who=who) for i in ids]
    _append(folder / LABELS, "".join(json.dumps(asdict(x)) + "\n" for x in labels).encode(), lock=True)
    return labels


def append_queue(folder: str | Path, entry: QueueEntry) -> None:
    """Append the entry's line to queue.jsonl (whole, or nothing: OutputError naming the file)."""
    _append(Path(folder) / QUEUE, queue_line(entry))


def _append(path: Path, data: bytes, lock: bool = False) -> None:
    """One write of whole lines to the end of `path` (under an exclusive lock if asked); a failed or short write is
    cut back, so the file never ends in half a line."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({os_reason(e)}); nothing written") from None
    try:
        if lock:
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise OutputError(f"{path}: cannot write ({os_reason(e)}); nothing written") from None
    finally:
        os.close(fd)  # also releases the lock


def labelled_frames(folder: str | Path) -> list[tuple[QueueEntry, LabelValue]]:
    """The queued frames that carry a label (the last one given), in queue order."""
    labels = read_labels(folder)
    return [(e, labels[e.id].label) for e in read_queue(folder) if e.id in labels]


def queue_line(entry: QueueEntry) -> bytes:
    """The entry as one line of queue.jsonl."""
    return (json.dumps(asdict(entry)) + "\n").encode()


def rewrite_queue(folder: str | Path, entries: list[QueueEntry]) -> None:
    """Replace queue.jsonl with `entries`, atomically: a reader sees the old queue or the new, never half."""
    with atomic_write(Path(folder) / QUEUE) as f:
        f.write(b"".join(queue_line(e) for e in entries))
