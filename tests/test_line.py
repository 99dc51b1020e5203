"""engine.run's line integration against real receivers, started by the tests on free loopback ports.

MQTT: a real Mosquitto broker (Debian package `mosquitto`; .ci/run installs it), with persistence so that a
restart keeps the test subscriber's session. Webhooks: an HTTP server in a thread. Every run is the real
CLI in a subprocess; every server stops when its test ends.
"""

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import cli, free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install -e .)")


class Broker:
    """mosquitto on a free loopback port, persistence on (a restart keeps sessions and queued messages)."""

    def __init__(self, folder: Path, extra: str = "allow_anonymous true\n"):
        self.port, self.folder, self.proc = free_port(), folder, None
        folder.mkdir(parents=True, exist_ok=True)
        as_root = "user root\n" if os.geteuid() == 0 else ""  # else it drops to user mosquitto: no access to tmp
        (folder / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\n{extra}persistence true\n"
            f"persistence_location {folder}/\nautosave_interval 1\n{as_root}")

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.folder / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto; .ci/run does)")
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


class Subscriber:
    """A persistent-session QoS-1 subscriber to PREFIX/#: what the line controller would see, in arrival order."""

    def __init__(self, port: int, prefix: str, client_id: str = "test-subscriber", ca: Path | None = None,
                 auth: tuple[str, str] | None = None):
        import paho.mqtt.client as mqtt
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, m.retain))
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=0.5)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        time.sleep(0.3)

    def results(self) -> list[dict]:
        return [json.loads(p) for t, p, _ in self.messages if t.endswith("/result")]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _first_seen(results: list[dict]) -> list[int]:
    seen, order = set(), []
    for r in results:
        if r["index"] not in seen:
            seen.add(r["index"])
            order.append(r["index"])
    return order


def test_every_frame_arrives_in_order_with_its_result(line, broker, tmp_path):
    sub = Subscriber(broker.port, "plant/line1")
    out = tmp_path / "r.jsonl"
    proc = cli(line["engine"], "--source", line["frames"], "--out", out, "--quiet", "--camera-name", "cam-A",
               "--mqtt", f"mqtt://127.0.0.1:{broker.port}/plant/line1", "--mqtt-heartbeat", "0.2")
    assert proc.returncode == 0, proc.stderr
    time.sleep(0.5)
    sub.close()
    jsonl = _jsonl(out)
    got = sub.results()
    assert [r["index"] for r in got] == list(range(line["n"]))  # each once, in order (QoS 1 on a steady link)
    for msg, ref in zip(got, jsonl):
        assert {k: msg[k] for k in ref} == ref  # the JSONL result's keys and values
        assert msg["latency_ms"] > 0
    topics = {t for t, _, _ in sub.messages}
    assert {"plant/line1/cam-A/result", "plant/line1/cam-A/status", "plant/line1/cam-A/heartbeat"} <= topics
    status = [p.decode() for t, p, _ in sub.messages if t.endswith("/status")]
    assert status[0] == "online" and status[-1] == "offline"
    beat = json.loads([p for t, p, _ in sub.messages if t.endswith("/heartbeat")][-1])
    assert {"frames_per_s", "frames", "dropped", "errors", "messages_waiting"} <= set(beat)
    assert f"{line['n']} of {line['n']} messages delivered" in proc.stderr


def test_the_api_sinks_as_docs_line_md_shows_them(line, broker):
    """docs/line.md's API example: MqttSink and LiveView fed from engine.run's loop, closed at the end."""
    import urllib.request

    import engine
    from engine.sinks import LiveView, MqttSink
    sub = Subscriber(broker.port, "plant/api", client_id="api-subscriber")
    with engine.load(line["engine"]) as eng:
        stats = engine.StreamStats()
        sinks = [MqttSink(f"mqtt://127.0.0.1:{broker.port}/plant/api", camera="cam-A", stats=stats),
                 LiveView("127.0.0.1:0", eng.threshold, stats=stats)]
        try:
            for r in engine.run(eng, str(line["frames"]), stats=stats):
                for s in sinks:
                    s.write(r)
            with urllib.request.urlopen(f"http://127.0.0.1:{sinks[1].port}/stats.json", timeout=5) as response:
                served = json.loads(response.read())
        finally:
            for s in sinks:
                s.close()
    time.sleep(0.3)
    sub.close()
    assert [r["index"] for r in sub.results()] == list(range(line["n"]))
    assert served["passed"] + served["failed"] == line["n"] and len(served["scores"]) == line["n"]


def test_a_broker_restart_mid_run_loses_nothing(line, broker, tmp_path):
    """The broker stops for 1.5 s of a 6 s run (10 frames/s): the messages wait in the client's store, are resent
    on reconnect, and every frame reaches the subscriber (its session persisted by the broker), in order of
    first arrival (QoS 1 may deliver one twice)."""
    sub = Subscriber(broker.port, "plant/line2", client_id="restart-subscriber")
    out = tmp_path / "r.jsonl"
    run = cli(line["engine"], "--source", line["frames"], "--out", out, "--quiet", "--max-fps", "10",
              "--mqtt", f"mqtt://127.0.0.1:{broker.port}/plant/line2", wait=False)
    time.sleep(1.0)
    broker.stop()
    time.sleep(1.5)
    broker.start()
    stdout, stderr = run.communicate(timeout=120)
    time.sleep(1.5)
    sub.close()
    assert run.returncode == 0, stderr
    order = _first_seen(sub.results())
    assert order == list(range(line["n"])), f"missing or out of order: {order}\n{stderr}"
    waited = int(stderr.split(" waited for the broker")[0].rsplit(", ", 1)[-1])
    assert waited > 0 and "lost the broker" in stderr and "delivering" in stderr
    assert f"{line['n']} of {line['n']} messages delivered" in stderr and "0 not delivered" in stderr
    assert len(_jsonl(out)) == line["n"]


def test_a_broker_that_never_comes_does_not_stop_the_run(line, tmp_path):
    port = free_port()  # nothing listens there
    out = tmp_path / "r.jsonl"
    proc = cli(line["engine"], "--source", line["frames"], "--out", out, "--quiet",
               "--mqtt", f"mqtt://127.0.0.1:{port}/plant/line3")
    assert proc.returncode == 0, proc.stderr
    assert len(_jsonl(out)) == line["n"]
    assert f"cannot reach the broker at 127.0.0.1:{port}" in proc.stderr
    assert f"{line['n']} not delivered" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{line['n']} messages not delivered")
    assert "Traceback" not in proc.stderr


def test_tls_and_a_password(line, tmp_path):
    """mqtts:// with a CA file, the user in the URL and the password from LINEFLOW_MQTT_PASSWORD; a wrong
    password is a refused connection: a warning, the run completes, nothing delivered and said so."""
    if MOSQUITTO is None or shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto, mosquitto_passwd and openssl (Debian packages mosquitto, openssl)")
    d = tmp_path / "tls"
    d.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", d / "key.pem", "-out", d / "cert.pem"],
                   check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", "-c", d / "passwd", "lineuser", "s3cret"], check=True,
                   capture_output=True)
    broker = Broker(d / "broker", f"allow_anonymous false\npassword_file {d}/passwd\ncertfile {d}/cert.pem\n"
                                  f"keyfile {d}/key.pem\n").start()
    try:
        sub = Subscriber(broker.port, "plant/tls", "tls-subscriber", ca=d / "cert.pem", auth=("lineuser", "s3cret"))
        url = f"mqtts://lineuser@127.0.0.1:{broker.port}/plant/tls"
        proc = cli(line["engine"], "--source", line["frames"], "--quiet", "--mqtt", url, "--mqtt-ca", d / "cert.pem",
                   env={"LINEFLOW_MQTT_PASSWORD": "s3cret"})
        time.sleep(0.3)
        sub.close()
        assert proc.returncode == 0 and f"{line['n']} of {line['n']} messages delivered" in proc.stderr, proc.stderr
        assert [r["index"] for r in sub.results()] == list(range(line["n"]))
        wrong = cli(line["engine"], "--source", line["frames"], "--quiet", "--mqtt", url, "--mqtt-ca",
                    d / "cert.pem", env={"LINEFLOW_MQTT_PASSWORD": "wrong"})
        assert wrong.returncode == 0 and "refused the connection" in wrong.stderr, wrong.stderr
        assert wrong.stderr.strip().splitlines()[-1].endswith(f"{line['n']} messages not delivered")
    finally:
        broker.stop()


@pytest.mark.parametrize("url,why", [
    ("http://127.0.0.1:1883/x", "must start with mqtt:// or mqtts://"),
    ("mqtt://127.0.0.1:notaport/x", "port is not a number"),
    ("mqtt://127.0.0.1:1883", "the path is the topic prefix"),
    ("mqtt://127.0.0.1:1883/a/#", "without # or +"),
    ("mqtt://no-such-host.invalid:1883/x", "cannot resolve host 'no-such-host.invalid'")])
def test_a_bad_broker_url_is_bad_input_before_any_frame(line, tmp_path, url, why):
    out = tmp_path / "r.jsonl"
    proc = cli(line["engine"], "--source", line["frames"], "--out", out, "--mqtt", url)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert why in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and proc.stdout == ""


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list
    seen_headers: list
    delay = 0.0
    fail_first = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(500)
            self.end_headers()
            return
        time.sleep(type(self).delay)
        type(self).bodies.append(json.loads(body))
        type(self).seen_headers.append(self.headers)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    """An HTTP server on a free loopback port; its handler class collects the POSTed JSON bodies."""
    handler = type("Receiver", (_Receiver,), {"bodies": [], "seen_headers": [], "delay": 0.0, "fail_first": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_webhook_posts_each_anomalous_frame_and_retries(line, receiver, tmp_path):
    handler, url = receiver
    handler.fail_first = 2  # the first POST fails twice (500), then succeeds on the retry
    out = tmp_path / "r.jsonl"
    proc = cli(line["engine"], "--source", line["frames"], "--out", out, "--quiet", "--webhook", url)
    assert proc.returncode == 0, proc.stderr
    anomalous = [r for r in _jsonl(out) if r["is_anomalous"]]
    assert 0 < len(anomalous) < line["n"]
    assert [b["index"] for b in handler.bodies] == [r["index"] for r in anomalous]
    assert all(b["is_anomalous"] and "latency_ms" in b for b in handler.bodies)
    assert f"{len(anomalous)} delivered, 0 failed" in proc.stderr


def test_a_post_given_up_at_close_is_counted_once(receiver):
    """close() stops waiting for a slow POST and counts it as not sent; when the POST ends later, it is not
    counted again as delivered."""
    from engine.results import Result
    from engine.sinks import WebhookSink
    handler, url = receiver
    handler.delay = 0.5
    sink = WebhookSink(url, every_frame=True, warn=lambda s: None, flush_timeout=0.05)
    sink.write(Result(0.5, False, None))
    deadline = time.monotonic() + 5
    while not sink.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.close()
    sink.thread.join(5)
    assert not sink.thread.is_alive() and len(handler.bodies) == 1  # the POST did arrive, after close gave up
    assert (sink.sent, sink.failed, sink.unsent) == (0, 0, 1)


def test_a_slow_webhook_never_stalls_the_run(line, receiver, tmp_path):
    """Each POST takes 0.3 s and every frame is posted: 60 frames would take 18 s in line; the run does not wait
    for them (bounded queue of 5: the oldest dropped, counted), and stderr says what was not delivered."""
    handler, url = receiver
    handler.delay = 0.3
    proc = cli(line["engine"], "--source", line["frames"], "--quiet", "--webhook", url, "--webhook-all",
               "--webhook-queue", "5")
    assert proc.returncode == 0, proc.stderr
    took = float(proc.stderr.split(" frames in ")[1].split(" s")[0])
    assert took < 6, proc.stderr  # the frames themselves: inference never waited on the receiver
    dropped = int(proc.stderr.split(" dropped (queue full)")[0].rsplit(", ", 1)[-1])
    assert dropped > 0 and "messages not delivered" in proc.stderr.strip().splitlines()[-1]


def test_results_written_before_the_first_connection_go_out_first_and_in_order(monkeypatch):
    """paho-mqtt sends what is published between CONNECT and CONNACK ahead of what it queued before (its issue
    910: frames 1, 0, 2, ... at the subscriber). The sink hands paho nothing before the first connection and
    then the waiting results in order, ahead of those written while it connects (a fake paho client here)."""
    import paho.mqtt.client as mqtt

    from engine.results import Result
    from engine.sinks import MqttSink
    handed: list[int] = []

    class FakeClient:
        def __init__(self, *a, **k):
            self.mid, self.connected = 0, False

        def publish(self, topic, payload, qos=0, retain=False):
            if topic.endswith("/result"):
                assert self.connected, "a result was handed to paho before the broker's CONNACK"
                handed.append(json.loads(payload)["index"])
                time.sleep(0.001)  # the writer and the heartbeat thread interleave here if they can
            self.mid += 1
            return type("Info", (), {"mid": self.mid, "rc": 0, "wait_for_publish": lambda self, timeout=None: None})()

        def __getattr__(self, name):  # username_pw_set, will_set, connect_async, loop_start, disconnect...
            return lambda *a, **k: None

    monkeypatch.setattr(mqtt, "Client", FakeClient)
    sink = MqttSink("mqtt://127.0.0.1:1883/plant", warn=lambda s: None, flush_timeout=0.5)
    written = 0

    def write_next():
        nonlocal written
        sink.write(Result(0.5, False, None, index=written))
        written += 1

    def connack():
        sink.client.connected = True
        sink._on_connect(sink.client, None, None, type("Code", (), {"is_failure": False})())

    for _ in range(20):
        write_next()
    assert handed == [] and sink.pending == 20
    timer = threading.Timer(0.01, connack)
    timer.start()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # before, while and after it connects
        write_next()
        time.sleep(0.0005)
    timer.join()
    sink.close()
    assert written > 40 and handed == list(range(written))


def test_results_written_around_a_reconnect_wait_behind_what_paho_resends(monkeypatch):
    """After a reconnect paho calls on_connect first and resends what it held (unacknowledged) after it returns
    (paho-mqtt 2.x, Client._handle_connack): a result written in that gap, or during the outage, would reach the
    broker ahead of older ones. The sink holds them until every earlier message is acknowledged. A fake paho
    client with that order: what reaches the broker, what is lost with a broken connection, what it resends."""
    import paho.mqtt.client as mqtt

    from engine.results import Result
    from engine.sinks import MqttSink
    ok = type("Code", (), {"is_failure": False})()

    class FakeClient:
        def __init__(self, *a, **k):
            self.mid, self.up, self.lock = 0, False, threading.Lock()
            self.payloads: dict[int, str] = {}
            self.store: dict[int, None] = {}  # unacknowledged QoS-1 results, in the order published
            self.wire: list[int] = []  # sent on the connection, not yet at the broker
            self.arrived: list[int] = []  # frame indices, in the order the broker got them (QoS 1: maybe twice)

        def publish(self, topic, payload, qos=0, retain=False):
            with self.lock:
                self.mid += 1
                if topic.endswith("/result"):
                    self.payloads[self.mid], self.store[self.mid] = payload, None
                    if self.up:
                        self.wire.append(self.mid)
                return type("Info", (), {"mid": self.mid, "rc": 0,
                                         "wait_for_publish": lambda self, timeout=None: None})()

        def deliver(self):
            """The broker receives what is on the wire and acknowledges it."""
            with self.lock:
                mids, self.wire = self.wire, []
                for mid in mids:
                    self.arrived.append(json.loads(self.payloads[mid])["index"])
                    self.store.pop(mid, None)
            for mid in mids:
                self.on_publish(self, None, mid, ok, None)

        def drop(self):
            with self.lock:
                self.up, self.wire = False, []  # what was on the wire is lost with the connection
            self.on_disconnect(self, None, None, "connection lost", None)

        def connack(self, between=lambda: None):
            self.up = True
            self.on_connect(self, None, None, ok, None)
            between()  # another thread's write, in the moments before paho resends
            with self.lock:
                self.wire.extend(self.store)

        def __getattr__(self, name):  # username_pw_set, will_set, connect_async, loop_start, disconnect...
            return lambda *a, **k: None

    monkeypatch.setattr(mqtt, "Client", FakeClient)
    sink = MqttSink("mqtt://127.0.0.1:1883/plant", warn=lambda s: None, flush_timeout=0.5)
    fake: FakeClient = sink.client
    written = 0

    def write_next():
        nonlocal written
        sink.write(Result(0.5, False, None, index=written))
        written += 1

    def delivered(n: int) -> bool:
        deadline = time.monotonic() + 5
        while len(set(fake.arrived)) < n and time.monotonic() < deadline:
            fake.deliver()
            time.sleep(0.01)
        return len(set(fake.arrived)) >= n

    fake.connack()
    for _ in range(3):
        write_next()
    assert delivered(3)
    write_next()  # 3: on the wire when the connection breaks
    fake.drop()
    write_next()  # 4, 5: during the outage
    write_next()
    fake.connack(between=write_next)  # 6: between on_connect and paho's resend
    write_next()  # 7: connected, 3 not yet acknowledged
    assert delivered(8)
    write_next()
    assert delivered(9)
    sink.close()
    assert list(dict.fromkeys(fake.arrived)) == list(range(9)), fake.arrived  # in order of first arrival


class _RawReceiver:
    """A webhook receiver on a raw socket: its first reply is `first` (malformed HTTP), every later one a 200; the
    POSTed JSON bodies are collected."""

    def __init__(self, first: bytes):
        self.first, self.bodies = first, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        body += conn.recv(65536)
                    self.bodies.append(json.loads(body))
                    reply = self.first if len(self.bodies) == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                    conn.sendall(reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("reply", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + b"X: y\r\n" * 200 + b"\r\n", b""],
                         ids=["bad-status-line", "line-too-long", "too-many-headers", "no-reply"])
def test_a_malformed_http_reply_does_not_stop_the_webhooks(reply):
    """http.client's BadStatusLine, LineTooLong, HTTPException and RemoteDisconnected are failed attempts of one
    POST (retried), never the end of the sender thread: every later message is still delivered."""
    from engine.results import Result
    from engine.sinks import WebhookSink
    receiver, warnings = _RawReceiver(reply), []
    sink = WebhookSink(receiver.url, every_frame=True, retries=1, warn=warnings.append, flush_timeout=5)
    try:
        for i in range(3):
            sink.write(Result(0.5, False, None, index=i))
        summary = sink.close()
    finally:
        receiver.close()
    assert sink.thread.is_alive() is False and (sink.sent, sink.failed, summary.undelivered) == (3, 0, 0), warnings
    assert [b["index"] for b in receiver.bodies] == [0, 0, 1, 2]  # the first POST retried after the bad reply
    assert len(warnings) == 1 and "retrying" in warnings[0]


def test_a_sender_thread_that_meets_an_unexpected_error_goes_on(receiver, monkeypatch):
    """Whatever a POST raises, it is a failed delivery counted and said, and the thread takes the next message."""
    import urllib.request

    from engine.results import Result
    from engine.sinks import WebhookSink
    handler, url = receiver
    real, calls = urllib.request.OpenerDirector.open, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("something nobody expected")
        return real(self, *a, **k)

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", flaky)
    warnings: list[str] = []
    sink = WebhookSink(url, every_frame=True, retries=0, warn=warnings.append, flush_timeout=5)
    for i in range(2):
        sink.write(Result(0.5, False, None, index=i))
    sink.close()
    assert (sink.sent, sink.failed) == (1, 1) and [b["index"] for b in handler.bodies] == [1]
    assert any("something nobody expected" in w for w in warnings), warnings


def test_a_webhook_redirect_is_a_failed_delivery_never_followed():
    """A 301/302/303 would turn the POST into a GET elsewhere (headers forwarded) whose 200 counted as delivered:
    it is a failed delivery, not retried (the receiver's answer would be the same), said once with the status and
    where it pointed (password hidden)."""
    from engine.results import Result
    from engine.sinks import WebhookSink
    seen: list[str] = []

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append("POST")
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            who = "user:s3cr3t@" if seen.count("POST") > 1 else ""  # the second points at a URL with a password
            self.send_header("Location", f"http://{who}127.0.0.1:{self.server.server_address[1]}/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            seen.append("GET")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    warnings: list[str] = []
    try:
        sink = WebhookSink(f"http://127.0.0.1:{server.server_address[1]}/hook", every_frame=True, retries=3,
                           warn=warnings.append, flush_timeout=5)
        sink.write(Result(0.5, False, None, index=0))
        sink.write(Result(0.5, False, None, index=1))
        summary = sink.close()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["POST", "POST"]  # never followed, never retried
    assert (sink.sent, sink.failed, sink.attempts, summary.undelivered) == (0, 2, 2, 2)
    assert warnings and all("302" in w and "s3cr3t" not in w and "\n" not in w for w in warnings), warnings
    assert "user:***@127.0.0.1" in warnings[-1], warnings
    assert "0 delivered, 2 failed" in summary.line


def test_the_webhook_url_password_never_shows(receiver):
    """Its warnings, its summary and its errors name the URL with the password hidden."""
    from engine.common.errors import UserError
    from engine.results import Result
    from engine.sinks import WebhookSink
    with pytest.raises(UserError) as bad:
        WebhookSink("ftp://user:s3cr3t@127.0.0.1/x")
    assert "s3cr3t" not in str(bad.value) and "user:***@" in str(bad.value)
    with pytest.raises(UserError) as bad:
        WebhookSink("http://user:s3cr3t@127.0.0.1:notaport/x")
    assert "s3cr3t" not in str(bad.value)
    handler, url = receiver  # a URL's USER:PASSWORD@ is sent as Basic authentication
    sink = WebhookSink(url.replace("http://", "http://us%40er:s3cr3t@"), every_frame=True, warn=pytest.fail)
    sink.write(Result(0.5, False, None))
    assert sink.close().undelivered == 0 and handler.seen_headers[0]["Authorization"] == "Basic dXNAZXI6czNjcjN0"
    warnings: list[str] = []
    sink = WebhookSink(f"http://user:s3cr3t@127.0.0.1:{free_port()}/x", every_frame=True, retries=0,
                       warn=warnings.append, flush_timeout=2)
    sink.write(Result(0.5, False, None))
    summary = sink.close()
    assert warnings and summary.undelivered == 1
    assert not any("s3cr3t" in text for text in [*warnings, summary.line]), (warnings, summary.line)


@pytest.mark.parametrize("url", ["mqtt://user:s3cr3t@bad host:x/p", "http://user:s3cr3t@127.0.0.1/p",
                                 "mqtt://user:s3cr3t@127.0.0.1:1883", "mqtt://user:s3cr3t@127.0.0.1/p?x=1",
                                 "mqtt://user:s3cr3t@127.0.0.1:99999/p"])
def test_a_malformed_broker_url_never_prints_its_password(url):
    from engine.common.errors import UserError
    from engine.sinks.mqtt import parse_mqtt_url
    with pytest.raises(UserError) as bad:
        parse_mqtt_url(url)
    assert "s3cr3t" not in str(bad.value) and "user:***@" in str(bad.value)


def test_the_mqtt_queue_stays_within_the_message_ids():
    """paho numbers the messages in flight 1..65535: a larger queue would reuse an id still in flight."""
    from engine.common.errors import UserError
    from engine.sinks import MqttSink
    for bad in (0, 65_536, 1_000_000):
        with pytest.raises(UserError, match="--mqtt-queue") as e:
            MqttSink(f"mqtt://127.0.0.1:{free_port()}/p", queue_limit=bad, warn=lambda s: None)
        assert "\n" not in str(e.value)
    MqttSink(f"mqtt://127.0.0.1:{free_port()}/p", queue_limit=65_535, warn=lambda s: None, flush_timeout=0.1).close()


def test_a_publish_paho_refuses_is_counted_as_dropped(monkeypatch):
    """paho refuses a publish with MQTT_ERR_QUEUE_SIZE (its queue full, or the message id still in flight): that
    result never goes out, so it is dropped and counted, said once; MQTT_ERR_NO_CONN keeps a QoS-1 message in paho's
    store (resent on connect), so it still waits. Every message is delivered, dropped or not delivered."""
    import paho.mqtt.client as mqtt

    from engine.results import Result
    from engine.sinks import MqttSink
    ok = type("Code", (), {"is_failure": False})()

    class FakeClient:
        def __init__(self, *a, **k):
            self.mid, self.results = 0, 0

        def publish(self, topic, payload, qos=0, retain=False):
            self.mid += 1
            rc = mqtt.MQTT_ERR_SUCCESS
            if topic.endswith("/result"):
                self.results += 1
                if self.results in (2, 5):
                    rc = mqtt.MQTT_ERR_QUEUE_SIZE
                elif self.results == 4:
                    rc = mqtt.MQTT_ERR_NO_CONN
            return type("Info", (), {"mid": self.mid, "rc": rc,
                                     "wait_for_publish": lambda self, timeout=None: None})()

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr(mqtt, "Client", FakeClient)
    warnings: list[str] = []
    sink = MqttSink("mqtt://127.0.0.1:1883/plant", warn=warnings.append, flush_timeout=0.2)
    sink._on_connect(sink.client, None, None, ok)
    deadline = time.monotonic() + 5
    while sink.holding and time.monotonic() < deadline:  # connected: results go straight to paho
        time.sleep(0.01)
    for i in range(6):
        sink.write(Result(0.5, False, None, index=i))
    for mid in range(1, sink.client.mid + 1):  # the broker acknowledges every message paho sent
        sink._on_publish(sink.client, None, mid)
    summary = sink.close()
    assert (sink.published, sink.acked, sink.dropped) == (4, 4, 2), summary.line
    assert summary.undelivered == 2 and "4 of 6 messages delivered" in summary.line and "2 dropped" in summary.line
    assert sum("refused" in w for w in warnings) == 1, warnings


class _Silent:
    """A TCP listener that accepts and never answers (a broker or receiver that hangs)."""

    def __init__(self):
        self.server, self.conns = socket.create_server(("127.0.0.1", 0)), []
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.server.accept()[0])
            except OSError:
                return

    def close(self):
        self.server.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("receivers", ["refused", "silent"])
def test_message_sinks_close_within_their_flush_timeout_when_receivers_are_away(receivers):
    """With the broker and the webhook receiver unreachable (nothing listens) or hanging (they accept and never
    answer), each close returns within its flush_timeout (1 s) plus 0.5 s, closed side by side in threads, as
    engine.run closes them; every message is counted as not delivered."""
    from engine.results import Result
    from engine.sinks import MqttSink, WebhookSink
    silent = _Silent() if receivers == "silent" else None
    port = silent.port if silent else free_port()
    try:
        sinks = [MqttSink(f"mqtt://127.0.0.1:{port}/plant", warn=lambda s: None, flush_timeout=1.0),
                 WebhookSink(f"http://127.0.0.1:{port}/x", every_frame=True, warn=lambda s: None, flush_timeout=1.0)]
        time.sleep(0.3)  # paho is in its connect attempts
        for i in range(5):
            for s in sinks:
                s.write(Result(0.5, False, None, index=i))
        took, summaries = {}, {}

        def close(s):
            t0 = time.monotonic()
            summaries[type(s).__name__] = s.close()
            took[type(s).__name__] = time.monotonic() - t0

        threads = [threading.Thread(target=close, args=(s,)) for s in sinks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        if silent:
            silent.close()
    assert set(took) == {"MqttSink", "WebhookSink"} and max(took.values()) < 1.5, took
    assert all(s.undelivered == 5 for s in summaries.values()), summaries


def test_an_mqtt_close_is_bounded_whatever_paho_is_doing(monkeypatch):
    """paho's disconnect and loop_stop may wait on a connect attempt (its connect timeout is 5 s): close waits for
    them only within its budget."""
    import paho.mqtt.client as mqtt

    from engine.sinks import MqttSink

    class StuckClient:
        def __init__(self, *a, **k):
            pass

        def loop_stop(self):
            time.sleep(5)

        def disconnect(self):
            time.sleep(5)

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr(mqtt, "Client", StuckClient)
    sink = MqttSink("mqtt://127.0.0.1:1883/plant", warn=lambda s: None, flush_timeout=1.0)
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 1.5
