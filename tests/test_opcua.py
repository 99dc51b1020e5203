"""engine.run --opcua: an OPC UA server (asyncua) a PLC subscribes to, checked with asyncua's own client on loopback.
Every server binds a free port and stops with its run or its sink; the secured one keeps its certificate in the
test's temporary folder."""

import asyncio
import json
import socket
import stat
import time
from datetime import UTC, datetime

import pytest
from conftest import clean_exit, cli, free_port, valid_lines

asyncua = pytest.importorskip("asyncua", reason="--opcua needs asyncua (pip install asyncua)")
from asyncua import Client, ua  # noqa: E402

from engine.common.errors import UserError  # noqa: E402
from engine.results import Result, Status  # noqa: E402
from engine.sinks.opcua import NAMESPACE, VARIABLES, OpcUaSink  # noqa: E402
from engine.sinks.opcua_cert import server_certificate  # noqa: E402

EACH_FRAME = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp)  # same value, new frame: told


class Notes:
    """A subscription's data changes, in order, by variable name."""

    def __init__(self):
        self.by_name: dict[str, list] = {}
        self.names: dict = {}

    def datachange_notification(self, node, value, data):
        self.by_name.setdefault(self.names[node.nodeid], []).append(value)


async def _camera_variables(client: Client, camera: str) -> dict:
    idx = await client.get_namespace_index(NAMESPACE)
    obj = await client.nodes.objects.get_child([f"{idx}:lineflow", f"{idx}:{camera}"])
    return {(await n.read_browse_name()).Name: n for n in await obj.get_children()}


async def _connect(url: str, proc=None, timeout: float = 30.0) -> Client:
    """A client connected to `url`, retried until the server is up (or `proc` ended)."""
    deadline = time.monotonic() + timeout
    while True:
        client = Client(url, timeout=5)
        try:
            await client.connect()
            return client
        except (TimeoutError, OSError):
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            await asyncio.sleep(0.1)


def _result(i: int, threshold: float = 0.5) -> Result:
    if i % 9 == 4:
        return Result(None, None, index=i, source="cam", timestamp=time.time(), error="dropped: inference was slower",
                      status=Status.DROPPED, engine=None, threshold=None)
    if i % 7 == 3:
        return Result(None, None, index=i, source="cam", timestamp=time.time(), error="unreadable", engine="e1",
                      threshold=threshold)
    score = (i * 37 % 100) / 100
    return Result(score, score > threshold, index=i, source="cam", timestamp=time.time(), engine="e1",
                  threshold=threshold)


def test_a_plc_subscription_sees_every_frames_verdict_in_order_equal_to_the_jsonl(tiny, tmp_path):
    """engine.run with --opcua on loopback: a subscription (timestamp trigger, a deep queue) gets each frame's
    LastVerdict, LastScore, LastFrameTime and Frames from the first it sees to the last, equal to the JSONL's lines;
    Status says "ended" when the source ends; the summary line says nothing was coalesced."""
    port, out = free_port(), tmp_path / "r.jsonl"
    proc = cli(tiny["engine"], "--source", tiny["frames"], "--out", out, "--quiet", "--max-fps", "60",
               "--camera-name", "line 1", "--opcua", f"opc.tcp://127.0.0.1:{port}", wait=False)

    async def watch() -> Notes:
        client = await _connect(f"opc.tcp://127.0.0.1:{port}", proc)
        notes = Notes()
        try:
            nodes = await _camera_variables(client, "line_1")
            assert sorted(nodes) == sorted(VARIABLES)
            notes.names = {n.nodeid: name for name, n in nodes.items()}
            sub = await client.create_subscription(20, notes)
            await sub._subscribe([nodes[n] for n in ("LastVerdict", "LastScore", "LastFrameTime", "Frames", "Status")],
                                 mfilter=EACH_FRAME, queuesize=1000)
            while proc.poll() is None:
                await asyncio.sleep(0.05)
        finally:
            try:
                await client.disconnect()
            except Exception:  # noqa: BLE001 - the server has gone with its run
                pass
        return notes

    notes = asyncio.run(watch())
    stderr = proc.stderr.read()
    assert proc.wait(30) == 0, stderr
    assert "0 skipped for newer ones (coalesced)" in stderr, stderr
    rows = valid_lines(out)
    frames = [f for f in notes.by_name["Frames"] if f > 0]
    first = frames[0]
    assert frames == list(range(first, len(rows) + 1)), "a frame's notification is missing or out of order"
    assert first < len(rows) // 2, f"the subscription began late (frame {first} of {len(rows)})"
    seen = rows[first - 1:]
    verdicts = [("dropped" if r["error"].startswith("dropped") else "error") if "error" in r
                else "anomalous" if r["is_anomalous"] else "ok" for r in seen]
    assert notes.by_name["LastVerdict"][-len(seen):] == verdicts
    scores = [r["score"] for r in seen if "score" in r]
    assert notes.by_name["LastScore"][-len(scores):] == scores  # equal, not close: the same doubles
    times = [t.timestamp() for t in notes.by_name["LastFrameTime"][-len(seen):]]
    assert times == pytest.approx([r["timestamp"] for r in seen], abs=1e-6)  # DateTime keeps microseconds
    assert notes.by_name["Status"][-1] == "ended"


def test_counts_and_last_values_equal_what_was_written_and_a_slow_server_thread_coalesces():
    """In process, no client: write() never waits; with room for one frame's values waiting, what the server thread
    did not take in time is skipped and counted, and the final values are the last frame's all the same."""
    sink = OpcUaSink("opc.tcp://127.0.0.1:0", "cam", threshold=0.5, engine_id="e1", waiting_max=1)
    results = [_result(i) for i in range(3000)]
    try:
        slowest = 0.0
        for r in results:
            t = time.perf_counter()
            sink.write(r)
            slowest = max(slowest, time.perf_counter() - t)
        deadline = time.monotonic() + 10
        while sink.waiting and time.monotonic() < deadline:
            time.sleep(0.01)

        async def read() -> dict:
            async with Client(sink.url, timeout=5) as client:
                return {k: await n.read_value() for k, n in (await _camera_variables(client, "cam")).items()}

        values = asyncio.run(read())
    finally:
        summary = sink.close()
    assert all(isinstance(getattr(sink, n), int) for n in ("frames", "coalesced", "waiting", "clients", "refused"))
    assert sink.applied + sink.coalesced == sink.frames == 3000 and sink.coalesced > 0
    assert f"{sink.coalesced} skipped for newer ones (coalesced)" in summary.line
    assert slowest < 0.05, f"write() took {slowest * 1000:.1f} ms"
    last = results[-1]
    assert values["Frames"] == 3000
    assert values["Anomalies"] == sum(bool(r.is_anomalous) for r in results)
    assert values["Dropped"] == sum(r.status is Status.DROPPED for r in results)
    assert values["Errors"] == sum(r.status is Status.ERROR for r in results)
    assert last.error == "unreadable" and values["LastVerdict"] == "error"
    assert values["LastScore"] == [r.score for r in results if r.score is not None][-1]
    assert values["LastFrameTime"] == datetime.fromtimestamp(last.timestamp, UTC)
    assert json.loads(values["LastResult"])["index"] == 2999
    assert (values["EngineId"], values["Threshold"], values["Status"]) == ("e1", 0.5, "running")


def test_a_secured_server_refuses_anonymous_clients_a_wrong_password_and_an_unsecured_channel(tmp_path, monkeypatch):
    """A user name forces security on loopback too: only Basic256Sha256 SignAndEncrypt is offered, with the self-signed
    certificate kept in the folder (its key readable by its owner alone); a wrong password is refused and counted, so
    is the right one sent over the unsecured channel asyncua opens for discovery (a client that skips the endpoints'
    check); the right one on a secured channel reads the values."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from cryptography.x509.oid import ExtendedKeyUsageOID
    warned: list[str] = []
    sink = OpcUaSink("opc.tcp://127.0.0.1:0", "cam", username="plc", password="s3cret", cert_dir=tmp_path / "certs",
                     threshold=0.5, warn=warned.append)
    client_cert, client_key = tmp_path / "client.der", tmp_path / "client.pem"
    asyncio.run(setup_self_signed_certificate(client_key, client_cert, "urn:test:client", "localhost",
                                              [ExtendedKeyUsageOID.CLIENT_AUTH], {}))

    async def attempt(password: str | None, secure: bool = True):
        client = Client(sink.url, timeout=5)
        if secure:
            await client.set_security(SecurityPolicyBasic256Sha256, str(client_cert), str(client_key))
        if password is not None:
            client.set_user("plc")
            client.set_password(password)
        async with client:
            return await (await _camera_variables(client, "cam"))["Threshold"].read_value()

    try:
        assert "made a self-signed server certificate" in warned[0] and sink.thumbprint in warned[0]
        assert stat.S_IMODE((tmp_path / "certs" / "server-key.pem").stat().st_mode) == 0o600
        with pytest.raises(ua.UaError, match="No matching endpoints"):  # none without security
            asyncio.run(attempt(None, secure=False))
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            asyncio.run(attempt("wrong"))
        with monkeypatch.context() as m, pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            m.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
            asyncio.run(attempt("s3cret", secure=False))
        assert sink.refused == 2
        assert asyncio.run(attempt("s3cret")) == 0.5
    finally:
        summary = sink.close()
    assert "2 clients refused" in summary.line and "asyncua reported" not in summary.line
    again = server_certificate(None, None, tmp_path / "certs", sink.app_uri, ["localhost"])
    assert again[4] is False and again[0] == sink.certificate, "the kept certificate was not reused"


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:4840", "must start with opc.tcp://"),
    ("opc.tcp://127.0.0.1:port", "not a number"),
    ("opc.tcp://0.0.0.0:4840", "beyond loopback a user name and password are needed"),
    ("opc.tcp://no-such-host.invalid:4840", "cannot resolve host"),
])
def test_bad_opcua_urls_are_refused_in_one_line(url, why):
    with pytest.raises(UserError, match=why) as e:
        OpcUaSink(url)
    assert "\n" not in str(e.value)


def test_a_bad_url_or_a_port_in_use_is_one_line_and_exit_2_before_any_frame(tiny, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = cli(tiny["engine"], "--source", tiny["frames"], "--out", out, "--opcua", "opc.tcp://127.0.0.1:0x1")
    assert "--opcua" in clean_exit(proc, 2) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli(tiny["engine"], "--source", tiny["frames"], "--out", out, "--opcua", f"opc.tcp://127.0.0.1:{port}")
    stderr = clean_exit(proc, 2)
    assert "port is in use" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()
