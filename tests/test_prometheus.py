"""engine.run --metrics: Prometheus metrics scraped during a real run equal the JSONL's counts; the names parse;
the sink counts errors by kind, follows a swapped engine, reads the message sinks' queues, and refuses a bad address
in one line before any frame is read."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.conftest import clean_exit, cli, free_port, python_process, valid_lines

pytest.importorskip("prometheus_client", reason="--metrics needs prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine.common.errors import UserError  # noqa: E402
from engine.results import Result, Status  # noqa: E402
from engine.sinks.metrics import Delivery, MetricsSink, error_kind, score_buckets  # noqa: E402


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels without camera): value} of one scrape, parsed by prometheus_client."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "camera")))] = s.value
    return out


def fake_engine(threshold=1.0, engine_id="aaaaaaaaaaaa"):
    return SimpleNamespace(threshold=threshold, engine_id=engine_id, backend_name="onnxruntime", precision="fp32")


def scored(i, score, engine_id="aaaaaaaaaaaa", threshold=1.0):
    return Result(score, score > threshold, index=i, source=f"{i}.png", captured_perf=time.perf_counter() - 0.003,
                  engine=engine_id, threshold=threshold)


def test_counters_equal_the_jsonl_when_scraped_during_a_run(tiny, tmp_path):
    """A folder of 24 frames, one of them not an image (a bad_frame error), read at 30 frames/s; scraped while it runs
    and after its last line: every count equals the JSONL's. The MQTT broker and webhook receiver are absent: their
    messages are counted as waiting or lost, and the broker's flush (up to 5 s) holds the run open for the last
    scrape (the metrics server closes last). An OPC UA server (where asyncua is installed) serves every frame's
    values."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted(tiny["frames"].iterdir())[:23]:
        shutil.copy(p, frames / p.name)
    (frames / "011b.png").write_bytes(b"not a png")
    out, port, dead = tmp_path / "r.jsonl", free_port(), free_port()
    opcua = importlib.util.find_spec("asyncua") is not None
    proc = python_process("-m", "engine.run", str(tiny["engine"]), "--source", str(frames), "--out", str(out),
                          "--max-fps", "30", "--quiet", "--camera-name", "line1", "--metrics", f"127.0.0.1:{port}",
                          "--mqtt", f"mqtt://127.0.0.1:{dead}/plant", "--mqtt-queue", "5",
                          "--webhook", f"http://127.0.0.1:{dead}/hook", "--webhook-all", "--webhook-retries", "0",
                          *(["--opcua", "opc.tcp://127.0.0.1:0"] if opcua else []))
    url = f"http://127.0.0.1:{port}/metrics"
    seen, last = [], None
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            try:
                last = scrape(url)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
                continue
            seen.append(last[("lineflow_frames_total", ())])
            served = sum(v for k, v in last.items() if k[0].startswith("lineflow_sink_") and ("sink", "opcua") in k[1])
            if seen[-1] == 24 and out.exists() and out.read_text().count("\n") == 24 and served == 24 * opcua:
                break
            time.sleep(0.05)
        proc.wait(30)
    finally:
        proc.kill()
    clean_exit(proc.communicate()[1], 0) if proc.returncode == 0 else pytest.fail(proc.stderr.read())
    rows = valid_lines(out)
    assert len(rows) == 24 and last is not None
    assert seen == sorted(seen) and seen[0] < 24, f"not scraped during the run, or a counter went back: {seen}"
    is_scored = [r for r in rows if "score" in r]
    assert last[("lineflow_frames_total", ())] == len(rows)
    assert last[("lineflow_scored_total", ())] == len(is_scored) == 23
    assert last[("lineflow_anomalies_total", ())] == sum(r["is_anomalous"] for r in is_scored)
    assert last[("lineflow_errors_total", (("kind", "bad_frame"),))] == 1
    assert last[("lineflow_dropped_total", ())] == 0
    assert last[("lineflow_score_count", ())] == last[("lineflow_latency_seconds_count", ())] == 23
    assert last[("lineflow_score_sum", ())] == pytest.approx(sum(r["score"] for r in is_scored), rel=1e-6)
    assert last[("lineflow_engine_info", (("backend", "onnxruntime"), ("engine_id", rows[0]["engine"]),
                                          ("precision", "fp32")))] == 1
    assert last[("lineflow_sink_waiting", (("sink", "mqtt"),))] == 5  # the queue's bound: the rest dropped
    assert last[("lineflow_sink_lost_total", (("sink", "mqtt"),))] == 24 - 5
    hook = [last[(f"lineflow_sink_{k}", (("sink", "webhook"),))] for k in ("waiting", "delivered_total", "lost_total")]
    assert hook[1] == 0 and sum(hook) == 24
    if opcua:
        assert last[("lineflow_sink_delivered_total", (("sink", "opcua"),))] == 24


def test_a_port_in_use_is_one_line_and_exit_2_before_any_frame(tiny, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = cli(tiny["engine"], "--source", tiny["frames"], "--out", tmp_path / "r.jsonl", "--metrics", str(port))
    err = clean_exit(proc, 2)
    assert f"--metrics 127.0.0.1:{port}: cannot listen there (the port is in use)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("address, why", [("http://x", r"expected \[HOST:\]PORT"), ("127.0.0.1:70000", "expected"),
                                          ("no-such-host.invalid:9100", "cannot resolve host")])
def test_a_bad_address_is_refused(address, why):
    with pytest.raises(UserError, match=why):
        MetricsSink(address, "cam", fake_engine())


def test_names_parse_and_errors_are_counted_by_kind():
    sink = MetricsSink("0", "cam", fake_engine())  # port 0: any free one, on 127.0.0.1
    try:
        for i, score in enumerate((0.5, 0.99, 1.0, 1.2, 3.0)):
            sink.write(scored(i, score))
        errors = ["dropped: inference was slower than the source", "bad frame: 0-d array", "/x/7.png: no such file",
                  "backend error: onnxruntime failed: X", "no frame from rtsp://cam/1: reconnecting in 1 s",
                  "server unavailable: grpc://h:8001/m", "non-finite score (nan): no verdict for this frame", "huh",
                  "incomplete frame 9 (missing packets): not scored", "camera lost (timeout): reconnecting in 1 s"]
        for i, text in enumerate(errors, 5):
            status = Status.DROPPED if text.startswith("dropped") else Status.ERROR
            sink.write(Result(None, None, index=i, source="/x/7.png", error=text, status=status))
        got = scrape(sink.url)
        families = {f.name: f.type for f in text_string_to_metric_families(urllib.request.urlopen(sink.url).read()
                                                                           .decode())}
    finally:
        sink.close()
    assert all(name.startswith("lineflow_") for name in families)
    assert families["lineflow_frames"] == "counter" and families["lineflow_score"] == "histogram"
    assert families["lineflow_engine_info"] == "gauge" and families["lineflow_frames_per_second"] == "gauge"
    assert got[("lineflow_frames_total", ())] == 15
    assert got[("lineflow_scored_total", ())] == 5 and got[("lineflow_anomalies_total", ())] == 2
    assert got[("lineflow_dropped_total", ())] == 1
    kinds = {dict(k[1])["kind"]: v for k, v in got.items() if k[0] == "lineflow_errors_total"}
    assert kinds == {"bad_frame": 2, "incomplete": 1, "backend": 1, "source": 2, "server": 1, "non_finite": 1,
                     "other": 1}
    assert got[("lineflow_score_bucket", (("le", "1.0"),))] == 3  # the threshold is an edge: le counts the passed
    assert got[("lineflow_latency_seconds_bucket", (("le", "0.0025"),))] == 0
    assert got[("lineflow_latency_seconds_bucket", (("le", "0.005"),))] == 5
    assert got[("lineflow_frames_per_second", ())] > 0


def test_error_kind_of_an_unreadable_file_and_score_buckets():
    assert error_kind(Result(None, None, source="a.png", error="a.png: cannot read image (x)")) == "bad_frame"
    assert error_kind(Result(None, None, source="a.png", error="something new")) == "other"
    assert 2.5 in score_buckets(2.5) and -0.3 in score_buckets(-0.3) and 0.0 in score_buckets(0.0)
    assert score_buckets(2.0)[0] == 0.1 and score_buckets(2.0)[-1] == 10.0 and len(score_buckets(2.0)) == 17


def test_engine_info_follows_a_swap_and_two_runs_share_a_process():
    """Two sinks in one process (their own registries and servers); the engine's id is the newest result's."""
    a, b = MetricsSink("127.0.0.1:0", "a", fake_engine()), MetricsSink("127.0.0.1:0", "b", fake_engine(2.0, "b" * 12))
    try:
        a.write(scored(0, 0.5))
        a.write(scored(1, 0.5, engine_id="cccccccccccc", threshold=0.25))
        got_a, got_b = scrape(a.url), scrape(b.url)
    finally:
        a.close()
        b.close()
    info = {dict(k[1])["engine_id"] for k in got_a if k[0] == "lineflow_engine_info"}
    assert info == {"cccccccccccc"} and got_a[("lineflow_threshold", ())] == 0.25
    assert got_a[("lineflow_frames_total", ())] == 2 and got_b[("lineflow_frames_total", ())] == 0
    assert {dict(k[1])["engine_id"] for k in got_b if k[0] == "lineflow_engine_info"} == {"b" * 12}


def test_a_sink_offering_delivery_is_read_and_a_foreign_host_is_refused():
    """The hook for message sinks (OPC UA): `delivery()` read at each scrape. On loopback, a request naming another
    host (DNS rebinding) gets 421."""
    opcua = SimpleNamespace(delivery=lambda: Delivery("opcua", 2, 40, 1))
    sink = MetricsSink("localhost:0", "cam", fake_engine(), [opcua, object()])
    try:
        got = scrape(sink.url)
        with pytest.raises(urllib.error.HTTPError, match="421"):
            urllib.request.urlopen(urllib.request.Request(sink.url, headers={"Host": "evil.example"}), timeout=5)
    finally:
        sink.close()
    assert got[("lineflow_sink_waiting", (("sink", "opcua"),))] == 2
    assert got[("lineflow_sink_delivered_total", (("sink", "opcua"),))] == 40
    assert got[("lineflow_sink_lost_total", (("sink", "opcua"),))] == 1


def test_a_broken_request_or_collector_is_no_traceback(capfd):
    """Garbage on the socket, a client gone mid-request, a sink whose numbers fail: the run's stderr gets one
    warning line, the scraper a 500, and nothing stops serving."""
    class Broken:
        def delivery(self):
            raise RuntimeError("boom")
    sink = MetricsSink("127.0.0.1:0", "cam", fake_engine(), [Broken()])
    try:
        for payload in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", sink.port)) as s:
                s.sendall(payload)
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError, match="500") as e:
                urllib.request.urlopen(sink.url, timeout=5)
            assert e.value.read() == b"lineflow metrics failed: RuntimeError: boom\n"
        sink.sinks.clear()
        assert scrape(sink.url)[("lineflow_frames_total", ())] == 0
    finally:
        sink.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("metrics: a scrape failed (RuntimeError: boom)") == 1, err
