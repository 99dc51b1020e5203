"""Drift alarms (engine/drift.py): the training frames' statistics travel model.pt -> engine header, the monitor raises
on a changed input or shifted scores and clears when they return, stays quiet on the training frames, and engine.run
reports it (stderr, JSONL, a retained MQTT message); engines from before the statistics watch their scores only."""

import json
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, free_port, perturbed_model, rewrite_version
from PIL import Image

from engine.common.frame_stats import InputStats, frame_stats
from engine.drift import INPUT_WINDOW, SCORE_WINDOW, DriftMonitor
from engine.header import EngineHeader
from engine.results import Result

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _frame(rng, level: float, hw=(48, 64)) -> np.ndarray:
    """A textured uint8 RGB frame of mean brightness about `level`."""
    a = level + 0.15 * rng.standard_normal((*hw, 3))
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


def _frames(n: int, seed: int, hw=(48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_frame(rng, rng.uniform(0.4, 0.6), hw) for _ in range(n)]


def _stats(frames: list[np.ndarray]) -> InputStats:
    return InputStats.from_frames([f.shape[:2] for f in frames], np.stack([frame_stats(f) for f in frames]))


def _header(stats: InputStats | None, holdout: list[float] | None) -> EngineHeader:
    return EngineHeader(backend="torch", input_size=(48, 64), threshold=1.0,
                        model_threshold={"threshold": 1.0, **({"holdout_scores": holdout} if holdout else {})},
                        input_stats=None if stats is None else stats.to_dict())


def _observe(mon: DriftMonitor, frames: list[np.ndarray], scores: list[float] | None = None, start: int = 0) -> list:
    out = []
    for i, f in enumerate(frames):
        r = Result(0.1 if scores is None else scores[i], False, index=start + i, engine="e")
        mon.observe(f, r)
        out.append(r.drift)
    return out


@pytest.fixture(scope="module")
def train_frames():
    return _frames(60, seed=0)


def test_a_frame_measures_the_same_from_a_camera_and_from_a_file():
    """uint8 BGR as a camera gives it, float RGB as a decoded file: the same statistic (one formula, both sides)."""
    rgb = _frames(1, seed=1, hw=(461, 1131))[0]
    assert np.allclose(frame_stats(rgb[:, :, ::-1].copy(), bgr=True), frame_stats(rgb.astype(np.float32) / 255))
    gray = rgb[:, :, 0]
    assert np.allclose(frame_stats(gray)[:3], frame_stats(gray)[0])


def test_a_steady_stream_of_the_training_frames_and_more_like_them_raises_nothing(train_frames):
    mon = DriftMonitor.from_header(_header(_stats(train_frames), None))
    assert mon.watching == ("input",)
    drift = _observe(mon, train_frames + _frames(120, seed=5))
    assert drift == [[]] * 180 and mon.events_until() == []


def test_a_darker_input_raises_input_drift_within_half_a_window_and_clears_when_it_returns(train_frames):
    mon = DriftMonitor.from_header(_header(_stats(train_frames), None))
    steady, dark = _frames(20, seed=6), [(f * 0.4).astype(np.uint8) for f in _frames(20, seed=7)]
    drift = _observe(mon, steady + dark + _frames(20, seed=8))
    assert drift[:20] == [[]] * 20
    first = drift.index(["input"])
    assert first == 20 + INPUT_WINDOW // 2  # the window's median turns on its 5th dark frame
    raised, cleared = mon.events_until()
    assert (raised.kind, raised.raised, raised.index, cleared.raised) == ("input", True, first, False)
    assert raised.numbers["brightness r"]["window"] < raised.numbers["brightness r"]["training"][0]
    assert raised.line().startswith(f"drift: input drift raised at frame {first}: brightness r ")
    assert 40 < cleared.index < 40 + INPUT_WINDOW and drift[-1] == []


def test_one_odd_frame_raises_nothing(train_frames):
    mon = DriftMonitor.from_header(_header(_stats(train_frames), None))
    stream = _frames(30, seed=9)
    stream[15] = np.zeros_like(stream[15])
    stream[20] = _frames(1, seed=10, hw=(96, 64))[0]
    assert _observe(mon, stream) == [[]] * 30


def test_a_frame_size_training_rarely_had_raises_input_drift(train_frames):
    """A size 1 in 20 training frames had (below the range's 5 % quantile) raises once it fills the window."""
    rare = _frames(3, seed=11, hw=(60, 80))
    mon = DriftMonitor.from_header(_header(_stats(train_frames + rare), None))
    drift = _observe(mon, _frames(20, seed=12) + _frames(12, seed=13, hw=(60, 80)))
    assert drift[:20] == [[]] * 20 and drift[20 + INPUT_WINDOW // 2] == ["input"]
    event = mon.events_until()[0]
    assert event.numbers["area"]["window"] == 60 * 80 and "(frames 80x60)" in event.text


def test_scores_shifted_up_raise_score_drift_and_clear_when_they_return():
    rng = np.random.default_rng(3)
    holdout = list(rng.normal(0.2, 0.05, 60))
    mon = DriftMonitor.from_header(_header(None, holdout))
    assert mon.watching == ("score",) and "input drift off" in mon.notes[0]
    scores = list(rng.normal(0.2, 0.05, 60)) + list(rng.normal(0.5, 0.05, 40)) + list(rng.normal(0.2, 0.05, 40))
    frames = [np.zeros((48, 64, 3), np.uint8)] * len(scores)
    drift = _observe(mon, frames, scores)
    assert drift[:60] == [[]] * 60
    assert drift.index(["score"]) <= 60 + SCORE_WINDOW // 2 + 1
    raised, cleared = mon.events_until()
    assert raised.numbers["score"]["window"] > raised.numbers["score"]["holdout_quantile"]
    assert "median score of the last 25 frames" in raised.text and not cleared.raised and drift[-1] == []


def test_a_swapped_engine_rebases_the_monitor_on_its_own_header(train_frames):
    """for_engine follows the engine: the first result of another engine id re-bases; different held-out scores
    restart the score window, and a kind the new engine cannot watch is cleared with its reason."""

    class Swapping:
        def __init__(self, header, engine_id):
            self.header, self.engine_id = header, engine_id

    eng = Swapping(_header(_stats(train_frames), [0.1] * 10), "a")
    mon = DriftMonitor.for_engine(eng)
    dark = [(f * 0.4).astype(np.uint8) for f in _frames(10, seed=14)]
    _observe(mon, dark)
    assert mon.in_force() == ["input"] and mon.engine_id == "a"
    eng.header, eng.engine_id = _header(None, [0.1] * 10), "b"
    r = Result(0.1, False, index=10, engine="b")
    mon.observe(dark[0], r)
    assert r.drift == [] and mon.engine_id == "b" and mon.watching == ("score",)
    cleared = mon.events_until()[-1]
    assert (cleared.kind, cleared.raised, cleared.index, cleared.engine) == ("input", False, 10, "b")


@pytest.fixture(scope="module")
def watched(tmp_path_factory, train_frames):
    """An onnxruntime engine built from a model.pt that records the frames' statistics, and variants of its header:
    with held-out scores (`scored`), and as a format-8 file (no statistics: `old`)."""
    pytest.importorskip("onnxruntime", reason="the drift CLI tests run an onnxruntime engine")
    import engine
    from engine.builder import BuildConfig, build_engine
    from engine.format import read_engine, write_engine
    from train.checkpoint import load_model, save_model
    from train.input_stats import input_stats
    d = tmp_path_factory.mktemp("drift")
    (d / "train").mkdir()
    for i, f in enumerate(train_frames):
        Image.fromarray(f).save(d / "train" / f"{i:03d}.png")
    stats = input_stats(sorted((d / "train").iterdir()))
    model = perturbed_model(seed=4)
    meta = {"threshold": {"threshold": 1.0}, "input_stats": stats.to_dict()}
    save_model(d / "m.pt", model, meta)
    build_engine(model, load_model(d / "m.pt")[1], (d / "m.pt").read_bytes(), d / "m.engine",
                 BuildConfig("onnxruntime", "fp32"))
    header, sections = read_engine(d / "m.engine")
    with engine.load(d / "m.engine") as eng:
        holdout = [r.score for r in eng.infer(train_frames)]
    scored = replace(header, model_threshold={"threshold": 1.0, "holdout_scores": holdout})
    write_engine(d / "scored.engine", scored, sections)
    write_engine(d / "nostats.engine", replace(scored, input_stats=None), sections)
    rewrite_version(d / "nostats.engine", d / "old.engine", 8)
    stream = d / "stream"  # 20 frames like training, then 20 at 0.4 gain
    stream.mkdir()
    for i, f in enumerate(_frames(20, seed=20) + [(f * 0.4).astype(np.uint8) for f in _frames(20, seed=21)]):
        Image.fromarray(f).save(stream / f"{i:03d}.png")
    return {"dir": d, "stats": stats, "stream": stream, "header": header}


def test_the_statistics_travel_from_model_pt_into_the_engine_header(watched):
    from engine.format import read_engine
    from train.checkpoint import load_model
    assert load_model(watched["dir"] / "m.pt")[1].input_stats == watched["stats"]
    assert watched["header"].input_stats == watched["stats"].to_dict()
    assert read_engine(watched["dir"] / "scored.engine")[0].input_stats["sizes"] == [[48, 64, 60]]


def test_a_header_with_malformed_statistics_is_refused(watched, tmp_path):
    from engine.format import EngineFileError, read_engine, write_engine
    header, sections = read_engine(watched["dir"] / "m.engine")
    bad = {**header.input_stats, "brightness": [[0.5] * len(header.input_stats["quantiles"])] * 2}
    object.__setattr__(header, "input_stats", bad)  # past the dataclass's own check, as a hand-edited file would be
    write_engine(tmp_path / "bad.engine", header, sections)
    with pytest.raises(EngineFileError, match="input_stats.brightness must hold 3 channels"):
        read_engine(tmp_path / "bad.engine")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_engine_run_reports_input_drift_on_stderr_and_on_every_jsonl_line(watched, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = cli(watched["dir"] / "scored.engine", "--source", watched["stream"], "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = _jsonl(out)
    assert [r["drift"] for r in rows[:20]] == [False] * 20
    first = next(i for i, r in enumerate(rows) if r["drift"] and "input" in r["drift"])
    assert 20 <= first < 30 and all("input" in r["drift"] for r in rows[first:])
    assert f"drift: input drift raised at frame {first}: brightness" in proc.stderr
    off = cli(watched["dir"] / "scored.engine", "--source", watched["stream"], "--out", out, "--quiet", "--no-drift")
    assert off.returncode == 0 and "drift" not in off.stderr and all(r["drift"] is None for r in _jsonl(out))


def test_an_engine_of_format_8_runs_with_input_drift_off_and_says_so_once(watched, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = cli(watched["dir"] / "old.engine", "--source", watched["stream"], "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("drift: input drift off") == 1 and "score drift off" not in proc.stderr
    assert all(r["drift"] is False or r["drift"] == ["score"] for r in _jsonl(out))


@pytest.fixture
def broker(tmp_path):
    """mosquitto on a free loopback port (as tests/test_line.py starts it)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run does)")
    port = free_port()
    (tmp_path / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def test_the_drift_state_is_a_retained_mqtt_message(watched, broker):
    """After the run, a controller that subscribes late still reads the state in force: the retained message."""
    pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install -e .)")
    proc = cli(watched["dir"] / "scored.engine", "--source", watched["stream"], "--quiet", "--camera-name", "cam",
               "--mqtt", f"mqtt://127.0.0.1:{broker}/plant/line1")
    assert proc.returncode == 0, proc.stderr
    msg = _retained_message(broker, "plant/line1/cam/drift")
    assert "input" in msg["drift"] and msg["index"] >= 20 and msg["time"] > 0
    assert msg["kind"] in ("input", "score") and msg["state"] == "raised" and msg["numbers"]
    steady = cli(watched["dir"] / "scored.engine", "--source", watched["stream"], "--quiet", "--camera-name", "cam",
                 "--mqtt", f"mqtt://127.0.0.1:{broker}/plant/line1", "--no-drift")  # the next run: the alarm goes
    assert steady.returncode == 0, steady.stderr
    assert _retained(broker, "plant/line1/cam/drift") == {"drift": None, "state": "started", "watching": []}


def _retained_message(port: int, topic: str) -> dict:
    """The retained message on `topic`, as a late subscriber reads it (it must be marked retained)."""
    import paho.mqtt.client as mqtt
    got = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late")
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, m: got.append((m.payload, m.retain))
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    assert got and got[0][1], f"no retained message on {topic}"
    return json.loads(got[0][0])


def _retained(port: int, topic: str) -> dict:
    """The retained message's drift, state and watching keys."""
    msg = _retained_message(port, topic)
    return {k: msg.get(k) for k in ("drift", "state", "watching")}
