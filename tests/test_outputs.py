"""What the commands write: full disks, outputs of the wrong kind, two writers of one file, the overlay video.

Full disks are a small tmpfs mounted by the test (root and mount permission needed: CI runs as root;
elsewhere these tests skip and say so). Each test here failed before the change that it came with
(issue 18's closing note lists them).
"""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import clean_exit, mid_run, run_command, valid_lines
from PIL import Image

from engine.common.errors import EXIT_BAD_INPUT, EXIT_OUTPUT_FAILED


def test_disk_full_while_writing_results(tiny, small_disk):
    _fill(small_disk, 8 << 10)
    out = small_disk / "r.jsonl"
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out), "--quiet")
    err = clean_exit(proc, EXIT_OUTPUT_FAILED)
    assert f"{out}: cannot write results (No space left on device)" in err
    rows = valid_lines(out)  # whole lines only, every one before the fault
    assert 0 < len(rows) < 120


def test_disk_full_while_writing_maps(tiny, small_disk):
    _fill(small_disk, 40 << 10)
    maps = small_disk / "maps"
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--save-maps", str(maps),
                       "--quiet")
    err = clean_exit(proc, EXIT_OUTPUT_FAILED)
    assert "png: cannot write (No space left on device)" in err
    written = sorted(maps.iterdir())
    assert written and all(p.suffix == ".png" and not p.name.startswith(".") for p in written)  # no temporaries
    for p in written:
        Image.open(p).load()  # every PNG written is whole


def test_disk_full_while_writing_a_model(tiny, small_disk, demo_dir):
    _fill(small_disk, 64 << 10)
    out = small_disk / "m.pt"
    proc = run_command("train.fit", "--data", str(demo_dir), "--out", str(out), "--input-size", "64", "--epochs", "1",
                       "--flow-steps", "2", "--backbone", "efficientnet_lite0")
    err = clean_exit(proc, EXIT_OUTPUT_FAILED)
    assert "No space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no model, no temporary


def test_disk_full_while_writing_an_engine(tiny, small_disk):
    _fill(small_disk, 64 << 10)
    out = small_disk / "m.engine"
    proc = run_command("engine.build", str(tiny["model"]), "-o", str(out), "--backend", "onnxruntime",
                       "--precision", "fp32")
    err = clean_exit(proc, EXIT_OUTPUT_FAILED)
    assert "No space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_disk_full_while_writing_the_overlay_video(tiny, small_disk):
    _fill(small_disk, 24 << 10)
    out = small_disk / "v.mp4"
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--overlay-video", str(out),
                       "--quiet")
    err = clean_exit(proc, EXIT_OUTPUT_FAILED)
    assert f"{out}: the video is incomplete" in err or f"{out}: cannot write the video" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no partial video, no temporary


def test_two_processes_writing_the_same_out(tiny, tmp_path):
    proc, out = mid_run(tiny, tmp_path)
    second = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out),
                         "--quiet")
    err = clean_exit(second, EXIT_BAD_INPUT)
    assert "another process is writing its results there" in err
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert len(valid_lines(out)) >= 5  # the first writer's results, untouched


@pytest.mark.parametrize("option,make", [("--out", "dir"), ("--save-maps", "file"), ("--overlay-video", "dir")])
def test_output_of_the_wrong_kind_is_refused_before_anything_runs(tiny, tmp_path, option, make):
    target = tmp_path / "target"
    target.mkdir() if make == "dir" else target.write_text("keep")
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), option, str(target),
                       "--quiet")
    err = clean_exit(proc, EXIT_BAD_INPUT)
    assert err.startswith(f"error: {option} {target}: is a") and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_overlay_video_at_the_sources_frame_rate(tiny, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="video goes through OpenCV")
    src, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 7.0, (64, 64))
    for i in range(12):
        writer.write(np.full((64, 64, 3), 20 * i, np.uint8))
    writer.release()
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(src), "--overlay-video", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    cap = cv2.VideoCapture(str(out))
    fps, count = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    assert abs(fps - 7.0) < 0.01 and count == 12


@pytest.mark.parametrize("command", ["train.fit", "train.evaluate", "engine.build"])
def test_every_command_refuses_a_folder_as_its_output_file_before_working(tiny, demo_dir, tmp_path, command):
    target = tmp_path / "a_folder"
    target.mkdir()
    args = {"train.fit": ["--data", str(demo_dir), "--out"], "train.evaluate": [str(tiny["model"]), "--data",
            str(demo_dir), "--json"], "engine.build": [str(tiny["model"]), "-o"]}[command]
    proc = run_command(command, *args, str(target))
    err = clean_exit(proc, EXIT_BAD_INPUT)
    assert err.startswith(f"error: {args[-1]} {target}: is a folder") and len(err.strip().splitlines()) == 1, err
    assert proc.stdout == "" and not list(target.iterdir())  # refused before any work was done or printed


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (see _fill)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a full disk is simulated by mounting a small tmpfs, not permitted here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Leave about `leave` bytes free on `disk`."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))
