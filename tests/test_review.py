"""The review queue: engine.run --review writes it (engine/sinks/review.py), engine.review labels it, the folder's
format (engine/review_store.py) reads back what was written, last label wins, disk stays bounded. The review page
in a browser is in tests/test_view.py."""

import json
import time

import numpy as np
import pytest
from conftest import clean_exit, run_command
from PIL import Image

import engine
from engine.common.errors import UserError
from engine.results import Result
from engine.review_store import (
    ID_PATTERN,
    LABELS,
    QUEUE,
    append_labels,
    labelled_frames,
    read_labels,
    read_queue,
    skipped_lines,
)
from engine.sinks.review import ReviewSink, lossless_png, sampled


def _result(index: int, anomalous: bool, rng, side: int = 64) -> Result:
    frame = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)  # noise: its PNG hardly compresses
    return Result(2.0 if anomalous else 0.5, anomalous, rng.random((side, side), dtype=np.float32), index=index,
                  source=f"f{index:03d}.png", timestamp=1.0 + index, frame=frame, engine="abc123abc123", threshold=1.0)


def test_a_run_writes_a_queue_of_its_sampled_frames_and_a_second_run_continues_it(tiny, tmp_path):
    rev, out = tmp_path / "rev", tmp_path / "r.jsonl"
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out),
                       "--review", str(rev), "--review-sample", "0.25", "--quiet")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    queue = read_queue(rev)
    expected = [r["index"] for r in results if r["is_anomalous"] or sampled(0, r["index"], 0.25)]
    assert [e.index for e in queue] == expected and 10 < len(expected) < 60  # deterministic, about a quarter
    raw = [json.loads(line) for line in (rev / QUEUE).read_text().splitlines()]
    assert list(raw[0]) == ["id", "index", "source", "timestamp", "score", "is_anomalous", "engine", "threshold",
                            "frame", "overlay"]
    for e in queue:
        r = results[e.index]
        assert ID_PATTERN.fullmatch(e.id) and (e.source, e.timestamp, e.score, e.engine) == \
            (r["source"], r["timestamp"], r["score"], r["engine"])
        assert np.array_equal(np.asarray(Image.open(rev / e.frame)), np.asarray(Image.open(e.source)))  # lossless
        assert Image.open(rev / e.overlay).size == (64, 64)
    flagged = sum(r["is_anomalous"] for r in results)
    assert f"review: {len(queue)} kept ({flagged} flagged, {len(queue) - flagged} passed sampled), 0 evicted " \
           f"to stay under 500 MB -> {rev}" in proc.stderr
    again = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--review", str(rev),
                        "--review-sample", "0.25", "--quiet")
    assert again.returncode == 0, again.stderr
    both = read_queue(rev)
    assert len(both) == 2 * len(queue) and len({e.id for e in both}) == len(both)


@pytest.mark.parametrize("args,why", [(["--review-sample", "1.5"], "--review-sample 1.5: a share from 0 to 1"),
                                      (["--review-max-mb", "0"], "--review-max-mb 0: must be positive"),
                                      (["--review", "FILE"], "is a file; give a folder")])
def test_bad_review_options_are_bad_input_before_any_frame(tiny, tmp_path, args, why):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    if "--review" not in args:
        args += ["--review", str(tmp_path / "rev")]
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out",
                       str(tmp_path / "r.jsonl"), *args)
    assert why in clean_exit(proc, 2) and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "rev").exists()


def test_every_flagged_frame_is_kept_and_the_passed_sample_depends_only_on_seed_and_index(tiny, tmp_path):
    with engine.load(tiny["engine"]) as eng:
        results = list(engine.run(eng, tiny["frames"], with_maps=True))
    threshold = float(np.median([r.score for r in results]))  # about half of them flagged
    for r in results:
        r.is_anomalous, r.threshold = r.score > threshold, threshold
    kept = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sink = ReviewSink(tmp_path / name, sample=0.2, seed=seed)
        for r in results:
            sink.write(r)
            sink.flush()  # the test writes faster than a line: no frame left behind for the writer thread
        sink.close()
        kept[name] = [e.index for e in read_queue(tmp_path / name)]
    flagged = {r.index for r in results if r.is_anomalous}
    assert 20 < len(flagged) < 100 and flagged <= set(kept["a"])
    passed_kept = set(kept["a"]) - flagged
    assert passed_kept == {r.index for r in results if not r.is_anomalous and sampled(0, r.index, 0.2)}
    assert 0 < len(passed_kept) < 0.4 * (len(results) - len(flagged))
    assert kept["a"] == kept["b"] and set(kept["c"]) - flagged != passed_kept


def test_disk_stays_under_the_bound_evicting_the_oldest_unlabelled_first(tmp_path):
    rng, rev = np.random.default_rng(0), tmp_path / "rev"
    sink = ReviewSink(rev, sample=0.0, max_mb=0.3)  # about 15 entries of two 64x64 noise PNGs
    for i in range(4):
        sink.write(_result(i, True, rng))
    sink.flush()
    append_labels(rev, [e.id for e in read_queue(rev)[:2]], "good", "tester")  # the two oldest are labelled
    labelled = {e.id for e in read_queue(rev)[:2]}
    for i in range(4, 60):
        sink.write(_result(i, True, rng))
        sink.write(_result(1000 + i, False, rng))  # passed, not sampled at 0.0: never kept
        sink.flush()
        used = sum(p.stat().st_size for p in rev.iterdir())
        assert used <= 0.3e6
    summary = sink.close().line
    queue = read_queue(rev)
    assert labelled <= {e.id for e in queue}  # the labelled ones stay
    unlabelled = [e.index for e in queue if e.id not in labelled]
    assert unlabelled == list(range(60 - len(unlabelled), 60))  # the newest; the oldest went first
    evicted = 60 - len(queue)
    assert evicted > 30 and summary == f"review: 60 kept (60 flagged, 0 passed sampled), {evicted} evicted to stay " \
                                       f"under 0.3 MB -> {rev}"
    named = {n for e in queue for n in (e.frame, e.overlay)}
    assert {p.name for p in rev.iterdir()} == named | {QUEUE, LABELS}  # no file left behind, none missing


def test_a_reopened_folder_drops_what_a_crash_left_and_one_writer_at_a_time(tmp_path):
    rng, rev = np.random.default_rng(0), tmp_path / "rev"
    sink = ReviewSink(rev)
    for i in range(3):
        sink.write(_result(i, True, rng))
    sink.flush()
    with pytest.raises(UserError, match="another run is writing its review queue there"):
        ReviewSink(rev)
    sink.close()
    first, second, _ = read_queue(rev)
    (rev / first.frame).unlink()  # a frame gone: its entry leaves the queue
    (rev / "000009-abcdef.overlay.png").write_bytes(b"half")  # a file no line names (a crash before its line)
    with (rev / QUEUE).open("a") as f:
        f.write('{"id": "broken"\n')
    ReviewSink(rev).close()
    assert [e.id for e in read_queue(rev)] == [second.id, _.id] and skipped_lines(rev)[QUEUE] == 0
    assert not (rev / first.overlay).exists() and not (rev / "000009-abcdef.overlay.png").exists()


def test_labels_last_wins_malformed_lines_are_skipped_and_unknown_ids_write_nothing(tmp_path):
    rng, rev = np.random.default_rng(0), tmp_path / "rev"
    sink = ReviewSink(rev)
    for i in range(3):
        sink.write(_result(i, True, rng))
    sink.close()
    ids = [e.id for e in read_queue(rev)]
    append_labels(rev, ids, "good", "a")
    with (rev / LABELS).open("a") as f:
        bad_label = json.dumps({"id": ids[0], "label": "maybe", "when": ""})
        f.write(f'not json\n{{"id": "x y", "label": "good"}}\n{bad_label}\n')
    append_labels(rev, ids[:1], "defect", None)
    labels = read_labels(rev)
    assert labels[ids[0]].label == "defect" and labels[ids[0]].who is None and labels[ids[-1]].label == "good"
    assert skipped_lines(rev) == {QUEUE: 0, LABELS: 3}
    assert [(e.id, label) for e, label in labelled_frames(rev)] == [(ids[0], "defect")] + [(i, "good") for i in ids[1:]]
    before = (rev / LABELS).read_bytes()
    with pytest.raises(UserError, match="no queued frame with id nope; nothing written"):
        append_labels(rev, [ids[0], "nope"], "good", None)
    with pytest.raises(UserError, match="expected one of good, defect"):
        append_labels(rev, ids, "bad", None)
    assert (rev / LABELS).read_bytes() == before


def test_the_review_command_labels_lists_and_refuses_unknown_ids(tmp_path):
    rng, rev = np.random.default_rng(0), tmp_path / "rev"
    sink = ReviewSink(rev)
    for i in range(3):
        sink.write(_result(i, True, rng))
    sink.close()
    a, b, c = (e.id for e in read_queue(rev))
    proc = run_command("engine.review", str(rev), "--good", a, b, "--who", "ana")
    assert proc.returncode == 0 and "2 labelled good" in proc.stdout, proc.stderr
    assert run_command("engine.review", str(rev), "--defect", b).returncode == 0
    listing = run_command("engine.review", str(rev), "--list")
    rows = [line.split() for line in listing.stdout.splitlines()]
    assert rows[0] == ["id", "index", "source", "score", "verdict", "label"]
    assert rows[1:] == [[a, "0", "f000.png", "2.0000", "flagged", "good"], [b, "1", "f001.png", "2.0000", "flagged",
                        "defect"], [c, "2", "f002.png", "2.0000", "flagged", "-"]]
    assert read_labels(rev)[a].who == "ana"
    before = (rev / LABELS).read_bytes()
    bad = run_command("engine.review", str(rev), "--defect", c, "no-such-id")
    assert "no queued frame with id no-such-id; nothing written" in clean_exit(bad, 2)
    assert len(bad.stderr.strip().splitlines()) == 1 and (rev / LABELS).read_bytes() == before
    assert "no queue.jsonl here" in clean_exit(run_command("engine.review", str(tmp_path), "--list"), 2)


def test_frames_are_written_pixel_for_pixel():
    import cv2
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    sixteen = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    decode = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # noqa: E731
    assert np.array_equal(decode(lossless_png(eight, bgr=True)), eight)
    assert np.array_equal(decode(lossless_png(eight, bgr=False))[:, :, ::-1], eight)
    assert np.array_equal(decode(lossless_png(sixteen, bgr=False)), sixteen)
    as_read = eight.astype(np.float32) / 255.0  # a PNG folder's frames arrive as floats: back to the same 8 bits
    assert np.array_equal(decode(lossless_png(as_read, bgr=False))[:, :, ::-1], eight)
    deep = sixteen.astype(np.float32) / 65535.0
    assert decode(lossless_png(deep, bgr=False)).dtype == np.uint16


def test_the_run_never_waits_for_the_writer_and_a_full_disk_is_raised_naming_the_file(tmp_path, monkeypatch):
    import threading

    import engine.sinks.review as review
    rng, release = np.random.default_rng(0), threading.Event()
    slow = review.lossless_png
    monkeypatch.setattr(review, "lossless_png", lambda *a: release.wait(10) and slow(*a))  # a writer stuck
    sink = ReviewSink(tmp_path / "rev")
    sink.write(_result(0, True, rng))
    deadline = time.monotonic() + 10
    while sink.waiting.qsize() and time.monotonic() < deadline:  # until the writer holds it, stuck
        time.sleep(0.01)
    for i in range(1, review.BACKLOG + 6):
        sink.write(_result(i, True, rng))  # returns at once: BACKLOG wait, 5 are not kept
    release.set()
    assert ", 5 not kept (the writer was behind)" in sink.close().line and len(read_queue(tmp_path / "rev")) == 17

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    sink = ReviewSink(tmp_path / "rev2")
    monkeypatch.setattr(review.os, "replace", full)  # atomic_write's last step
    sink.write(_result(0, True, rng))
    sink.flush()
    with pytest.raises(OSError, match=r"rev2/000000-\w+\.frame\.png: cannot write \(No space left on device\)"):
        sink.write(_result(1, True, rng))
    with pytest.raises(OSError, match="No space left"):
        sink.close()
