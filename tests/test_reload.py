"""engine.run --reload (engine/reload.py): a new engine file at the same path is swapped in between batches, no frame
lost or scored twice; a file that does not load or fit is refused and the running engine stays."""

import os
import shutil
import signal
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import clean_exit, interruptible, perturbed_model, python_process, run_command, valid_lines, wait_lines

from engine.format import engine_id, read_engine, write_engine
from engine.reload import ReloadingEngine


def _retuned(src, dst, factor: float) -> str:
    """A copy of the engine with another threshold (the same graph): the id of the file written."""
    header, sections = read_engine(src)
    write_engine(dst, replace(header, threshold=header.threshold * factor), sections)
    return engine_id(dst.read_bytes())


def _replace(src, dst) -> None:
    """As a user swaps an engine: copied beside it, then renamed over it (atomic)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, dst)


@pytest.fixture(scope="module")
def other_size_engine(tmp_path_factory):
    """An engine of a 96 px model: it does not fit a run set up for 64 px."""
    pytest.importorskip("onnxruntime", reason="the reload tests run onnxruntime engines")
    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    d = tmp_path_factory.mktemp("other-size")
    model = perturbed_model(size=96, seed=3)
    save_model(d / "m.pt", model, {"threshold": {"threshold": 1.0}})
    build_engine(model, {"threshold": {"threshold": 1.0}}, (d / "m.pt").read_bytes(), d / "m.engine",
                 BuildConfig("onnxruntime", "fp32"))
    return d / "m.engine"


def test_a_replaced_file_is_swapped_in_and_each_result_names_its_engine(tiny, tmp_path):
    live = tmp_path / "live.engine"
    shutil.copy(tiny["engine"], live)
    new_id = _retuned(tiny["engine"], tmp_path / "new.engine", 0.5)
    events = []
    frame = np.full((64, 64, 3), 120, np.uint8)
    with ReloadingEngine(live, poll_s=3600, on_event=events.append) as eng:  # swaps only when asked
        old_id, old_threshold = eng.engine_id, eng.threshold
        before = eng.score([frame])[0]
        old = eng.current
        _replace(tmp_path / "new.engine", live)
        eng.reload_now()
        deadline = time.monotonic() + 30
        while eng.engine_id == old_id and time.monotonic() < deadline:
            time.sleep(0.05)
        after = eng.score([frame])[0]
        assert (before.engine, after.engine) == (old_id, new_id)
        assert (before.threshold, after.threshold) == (old_threshold, old_threshold * 0.5)
        assert abs(before.score - after.score) < 1e-6  # the same graph
        assert eng.swaps == 1 and len(events) == 1 and new_id in events[0]
        with pytest.raises(RuntimeError, match="closed"):  # the old engine is let go
            old.score([frame])


def test_a_file_that_does_not_load_or_fit_is_refused_and_the_engine_keeps_running(tiny, other_size_engine, tmp_path):
    live = tmp_path / "live.engine"
    shutil.copy(tiny["engine"], live)
    events = []
    frame = np.full((64, 64, 3), 50, np.uint8)
    with ReloadingEngine(live, poll_s=3600, on_event=events.append) as eng:
        first = eng.engine_id
        live.write_bytes(tiny["engine"].read_bytes()[:-100])  # rewritten in place, cut short
        assert not eng.check()
        _replace(other_size_engine, live)
        assert not eng.check()
        assert eng.engine_id == first and eng.score([frame])[0].engine == first and eng.refused == 2
        assert "damaged" in events[0] and "keeps running" in events[0]
        assert "input size 96x96 differs" in events[1], events
        _replace(tiny["engine"], live)  # the same bytes again: nothing to swap
        assert not eng.check() and eng.swaps == 0


def test_engine_run_reload_swaps_mid_run_without_losing_or_repeating_a_frame(tiny, tmp_path):
    live, out = tmp_path / "live.engine", tmp_path / "r.jsonl"
    shutil.copy(tiny["engine"], live)
    ids = [engine_id(live.read_bytes())] + [_retuned(tiny["engine"], tmp_path / f"e{i}.engine", 0.9 - i / 10)
                                            for i in range(2)]
    proc = python_process("-m", "engine.run", str(live), "--source", str(tiny["frames"]), "--out", str(out),
                          "--max-fps", "30", "--reload", "--quiet", preexec_fn=interruptible)
    wait_lines(out, 10, proc)
    _replace(tmp_path / "e0.engine", live)  # picked up by the watcher
    wait_lines(out, 50, proc)
    _replace(tmp_path / "e1.engine", live)
    proc.send_signal(signal.SIGHUP)  # at once
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    clean_exit(stderr, 0)
    rows = valid_lines(out)  # every index once, in order
    assert len(rows) == 120
    seen = [r["engine"] for r in rows]
    assert [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k] == ids, "each engine in turn, once"
    assert stderr.count("reload: live.engine: engine") == 2 and "2 engine swaps" in stderr


def test_reload_with_a_server_is_refused_in_one_line(tiny):
    proc = run_command("engine.run", "--server", "http://127.0.0.1:9/m", "--source", str(tiny["frames"]), "--reload")
    assert "--reload follows a local engine file" in clean_exit(proc, 2)
