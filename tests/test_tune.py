"""engine.tune: a retuned engine is its parent's graph under a new threshold (the max-rejected rule on the held-out
and labelled good scores) and a provenance record that the header's schema checks; errors in one line; the file
written atomically."""

import errno
import hashlib
import json
import shutil
import struct
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
from conftest import clean_exit, run_command

import engine
import engine.format
from engine import review_store
from engine.common.errors import OutputError, run_cli
from engine.common.images import read_image
from engine.format import engine_id, read_engine, read_engine_file, write_engine
from engine.header import EngineHeader
from engine.tune import main

HELD_OUT = range(60, 100)  # the tiny fixture's frames that stand for the held-out good images
GOOD, DEFECTS, REVIEWED = range(0, 10), range(10, 15), range(15, 20)  # frames 15-17 reviewed good, 18-19 defect


def _scores(path, frames) -> np.ndarray:
    """As engine.tune and engine.run score image files: decoded by read_image, one frame a call."""
    with engine.load(path) as eng:
        return np.array([eng.score([read_image(p)], with_maps=False)[0].score for p in frames])


def _queue(folder, frames, labels) -> None:
    """A review folder as engine.run --review leaves it, labelled as engine.review labels it."""
    folder.mkdir()
    for i, (path, label) in enumerate(zip(frames, labels)):
        entry_id = f"{i:06d}-abc"
        shutil.copy(path, folder / review_store.frame_name(entry_id))
        shutil.copy(path, folder / review_store.overlay_name(entry_id))
        review_store.append_queue(folder, review_store.QueueEntry(
            id=entry_id, index=i, source=str(path), timestamp=None, score=0.0, is_anomalous=False, engine=None,
            threshold=None, frame=review_store.frame_name(entry_id), overlay=review_store.overlay_name(entry_id)))
        review_store.append_labels(folder, [entry_id], "defect" if label == "good" else "good", None)  # changed:
        review_store.append_labels(folder, [entry_id], label, "tester")  # the last label wins


@pytest.fixture(scope="module")
def labelled(tiny, tmp_path_factory):
    """The tiny engine with held-out scores in its header (the parent), a good folder, a defect folder and a review
    folder of labelled frames. The tiny model scores every frame within a few millionths of one value c; the
    held-out scores are c + 0.01 k (k = 1..10) above them and c - 0.01 k (k = 1..30) below, so where the rule puts
    the threshold says how many good scores it counted."""
    d = tmp_path_factory.mktemp("tune")
    frames = sorted(tiny["frames"].iterdir())
    header, sections = read_engine(tiny["engine"])
    c = float(np.mean(_scores(tiny["engine"], frames[:20])))
    holdout = c + 0.01 * np.concatenate([np.arange(1, 11), -np.arange(1, 31)])
    parent = d / "parent.engine"
    write_engine(parent, replace(header, model_threshold={"threshold": header.threshold,
                                                          "holdout_scores": holdout.tolist()}), sections)
    for name, picked in (("good", GOOD), ("defects", DEFECTS)):
        (d / name).mkdir()
        for i in picked:
            shutil.copy(frames[i], d / name)
    _queue(d / "review", [frames[i] for i in REVIEWED], ["good"] * 3 + ["defect"] * 2)
    good = [frames[i] for i in [*GOOD, *REVIEWED[:3]]]
    defects = [frames[i] for i in [*DEFECTS, *REVIEWED[3:]]]
    return {"dir": d, "parent": parent, "holdout": holdout, "good": good, "defects": defects,
            "args": ["--good", str(d / "good"), "--defects", str(d / "defects"), "--review", str(d / "review")]}


def test_retuned_engine_is_the_parent_graph_with_the_threshold_by_the_rule(labelled, tmp_path, capsys):
    out = tmp_path / "new.engine"
    assert main([str(labelled["parent"]), "-o", str(out), *labelled["args"], "--max-rejected", "0.1"]) == 0
    stdout = capsys.readouterr().out
    parent_header, parent_sections, parent_id = read_engine_file(labelled["parent"])
    header, sections, new_id = read_engine_file(out)  # every checksum verified
    assert sections == parent_sections and new_id != parent_id and new_id in stdout
    # 40 held-out + 13 labelled good scores: 10 % is 5.3, so the threshold is the 6th highest, c + 0.05 (not
    # c + 0.06, as 40 scores would give, nor c + 0.04, as 60 would with the defects counted as good)
    assert header.threshold == labelled["holdout"][4]
    frames = labelled["good"] + labelled["defects"]
    np.testing.assert_allclose(_scores(out, frames), _scores(labelled["parent"], frames), atol=1e-6, rtol=0)
    with engine.load(out) as eng:
        assert eng.threshold == header.threshold and eng.engine_id == new_id
    assert replace(header, threshold=parent_header.threshold, provenance=None, checks=parent_header.checks) \
        == parent_header  # the rest of the header as it was, model_threshold included
    decisions = [{"frame": hashlib.sha256(p.read_bytes()).hexdigest(), "label": label}
                 for paths, label in ((labelled["good"], "good"), (labelled["defects"], "defect")) for p in paths]
    prov = header.provenance
    assert prov.pop("created") and prov == {
        "parent": engine_id(labelled["parent"].read_bytes()), "labels": {"good": 13, "defect": 7},
        "labels_sha256": hashlib.sha256(json.dumps(sorted(decisions, key=lambda d: d["frame"]), sort_keys=True,
                                                   separators=(",", ":")).encode()).hexdigest(),
        "rule": "max-rejected", "max_rejected": 0.1, "good_scores": 53, "parent_provenance": None}
    assert header.checks["retune"]["before"] == {"threshold": parent_header.threshold, "good_rejected": 0,
                                                 "defects_caught": 0}
    assert "before (parent.engine)" in stdout and "0 of 13 (0.0%)" in stdout and "labelled defects" in stdout


def test_max_rejected_0_passes_every_good_frame_and_retunes_in_place(labelled, tmp_path, capsys):
    path = tmp_path / "e.engine"
    shutil.copy(labelled["parent"], path)
    assert main([str(path), "-o", str(path), "--good", str(labelled["dir"] / "good"), "--max-rejected", "0"]) == 0
    header, _, first_id = read_engine_file(path)
    good = _scores(path, labelled["good"][:10])
    assert header.threshold == max(labelled["holdout"].max(), good.max())
    assert not (good > header.threshold).any() and "0 of 10 (0.0%)" in capsys.readouterr().out
    proc = run_command("engine.tune", str(path), "-o", str(path), "--review", str(labelled["dir"] / "review"))
    assert proc.returncode == 0, proc.stderr  # as a user runs it: the command line
    prov = read_engine_file(path)[0].provenance  # a retune of a retune: the parent's record chained
    assert prov["parent"] == first_id and prov["labels"] == {"good": 3, "defect": 2}
    assert prov["parent_provenance"]["labels"] == {"good": 10, "defect": 0}
    assert prov["parent_provenance"]["parent"] == engine_id(labelled["parent"].read_bytes())


def _cli(capsys, *args) -> str:
    """engine.tune run in this process as its command runs it: exit code 2 and the one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    return clean_exit(err, 2)


def test_errors_are_one_line_with_exit_2_and_write_nothing(labelled, tiny, tmp_path, capsys):
    out, parent, d = tmp_path / "new.engine", labelled["parent"], labelled["dir"]
    assert "no labels" in _cli(capsys, parent, "-o", out)
    empty = tmp_path / "review"
    empty.mkdir()
    assert "no labelled frames" in _cli(capsys, parent, "-o", out, "--review", empty)
    assert "no held-out good scores" in _cli(capsys, tiny["engine"], "-o", out, "--good", d / "good")
    bad = tmp_path / "bad"
    shutil.copytree(d / "good", bad)
    (bad / "zz.png").write_bytes(b"not an image")
    assert f"{bad / 'zz.png'}: cannot read image" in _cli(capsys, parent, "-o", out, "--good", bad)
    assert "is a folder" in _cli(capsys, parent, "-o", tmp_path, "--good", d / "good")
    assert "labelled frames" in _cli(capsys, parent, "-o", d / "good" / "000.png", "--good", d / "good")
    assert "must be in [0, 1)" in _cli(capsys, parent, "-o", out, "--good", d / "good", "--max-rejected", "1")
    assert sorted(tmp_path.iterdir()) == [bad, empty]  # no engine, no temporary file
    proc = run_command("engine.tune", str(parent), "-o", str(out), "--good", str(bad))
    assert str(bad / "zz.png") in clean_exit(proc, 2) and not out.exists() and proc.stdout == ""


def test_a_write_that_fails_leaves_the_engine_as_it_was(labelled, tmp_path, monkeypatch):
    path = tmp_path / "e.engine"
    shutil.copy(labelled["parent"], path)
    before = path.read_bytes()
    real = engine.format.atomic_write

    @contextmanager
    def disk_full_midway(target, *args, **kwargs):
        with real(target, *args, **kwargs) as f:
            class HalfWrites:
                def write(self, data):
                    f.write(data[:len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")
            yield HalfWrites()

    monkeypatch.setattr(engine.format, "atomic_write", disk_full_midway)
    with pytest.raises(OutputError, match="No space left"):
        main([str(path), "-o", str(path), "--good", str(labelled["dir"] / "good")])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["e.engine"]


def _reseal(path, out, edit) -> None:
    """`path` rewritten to `out` with its header JSON edited, every checksum made to match."""
    blob = path.read_bytes()
    head_len = struct.unpack_from("<Q", blob, 12)[0]
    head = json.loads(blob[20:20 + head_len])
    edit(head)
    new_head = json.dumps(head).encode()
    body = blob[:12] + struct.pack("<Q", len(new_head)) + new_head + blob[20 + head_len:-32]
    out.write_bytes(body + hashlib.sha256(body).digest())


def test_provenance_is_checked_when_an_engine_is_read(labelled, tmp_path):
    good = {"parent": "0123456789ab", "labels": {"good": 3, "defect": 1}, "labels_sha256": "0" * 64,
            "rule": "max-rejected", "max_rejected": 0.02, "good_scores": 43, "created": "2026-12-07T10:00:00+00:00"}
    header = read_engine(labelled["parent"])[0].to_dict()
    assert EngineHeader.from_dict({**header, "provenance": {**good, "parent_provenance": good}}).provenance
    for bad, message in (({**good, "by": "me"}, "unknown keys"), ({**good, "labels": {"good": 3}}, "labels"),
                         ({**good, "good_scores": "43"}, "good_scores"),
                         ({**good, "max_rejected": 1.0}, "max_rejected"), ({**good, "parent": None}, "parent"),
                         ({**good, "parent_provenance": {**good, "rule": 2}}, "rule")):
        with pytest.raises(ValueError, match=message):
            EngineHeader.from_dict({**header, "provenance": bad})
    out = tmp_path / "bad.engine"
    _reseal(labelled["parent"], out, lambda head: head.update(provenance={**good, "labels": [3, 1]}))
    with pytest.raises(engine.format.EngineFileError, match="malformed engine header.*provenance.labels"):
        read_engine_file(out)
