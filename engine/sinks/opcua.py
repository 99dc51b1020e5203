"""Verdicts to PLCs and SCADA over OPC UA (asyncua): a server in its own thread and asyncio loop; the line never waits.

Address space (namespace urn:lineflow; string node ids, stable: ns=<its index>;s=CAMERA.NAME):

    Objects/lineflow/CAMERA
        LastVerdict    String    the newest frame's verdict: "ok", "anomalous", "error" (not scored: its JSONL line has
                                 an error), "dropped" (the stream dropped it unscored); null before the first frame
        LastScore      Double    the newest scored frame's score (null until the first scored frame)
        LastFrameTime  DateTime  the newest frame's capture time (UTC): the JSONL's timestamp
        LastResult     String    the newest frame's JSON message, as MQTT sends it (the JSONL line, the threshold,
                                 latency_ms)
        Frames         Int64     results so far (JSONL lines); Frames - 1 is the newest frame's index
        Anomalies      Int64     anomalous frames
        Dropped        Int64     frames dropped unscored by the stream's drop-oldest policy
        Errors         Int64     frames not scored (unreadable, the backend failed, a non-finite score)
        Status         String    "running" (from the bind on), "ended" (the source ended), "stopped" (failed, Ctrl-C)
        EngineId       String    the engine that judged the newest frame (it changes when the engine is swapped)
        Threshold      Double    the threshold it was judged against

Each frame writes LastVerdict, LastFrameTime, LastResult, Frames and (where scored) LastScore, all with one
SourceTimestamp, the time the values reached the address space (later frames, later times): a data-change
subscription sees each verdict with the StatusValueTimestamp trigger, or subscribed to Frames or LastResult (which
change every frame) with the default one. The values are the Result's fields as every message sink sends them
(engine.sinks.base.result_message).

`write(result)` hands the frame's values to the server thread under a lock (microseconds) and returns. Up to
WAITING_MAX frames' values may wait for that thread; past it the oldest waiting frame's are skipped (its
notifications never happen; the counts stay right, since each frame carries them all): `coalesced` counts those,
said in the summary line. Slow clients are asyncua's business: each subscription keeps its own bounded queue, and
nothing a client does reaches the run's thread.

Security: bound to loopback (127.0.0.0/8, ::1, localhost) without a user name, the server takes anonymous clients
without security (the PLC runs elsewhere: this is for tools on this machine). Bound to any other address, or given a
user name, it offers only Basic256Sha256 SignAndEncrypt and that user name and password (no anonymous access), with a
certificate given (--opcua-cert/--opcua-key) or a self-signed one made once and kept in
$XDG_CONFIG_HOME/lineflow/opcua (~/.config/lineflow/opcua), whose SHA-1 thumbprint the start line shows (clients
trust it by that). Any client certificate is accepted: the password is the access control. A session on the
unsecured channel that asyncua opens for discovery (GetEndpoints) is refused, whatever the password.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from engine.common.errors import UserError, one_line
from engine.common.net import is_loopback, resolve, url_port
from engine.common.redact import redact
from engine.results import Result, Status
from engine.sinks.base import FLUSH_TIMEOUT_S, SinkSummary, result_message, warn_on_stderr
from engine.sinks.opcua_cert import default_certificate_dir, server_certificate, thumbprint

__all__ = ["OpcUaSink", "OpcUaTarget", "parse_opcua_url", "NAMESPACE", "VARIABLES"]

NAMESPACE = "urn:lineflow"
OPCUA_PORT = 4840  # IANA's port for OPC UA over TCP
# each camera's variables and their OPC UA types, in the order a browser lists them
VARIABLES = {"LastVerdict": "String", "LastScore": "Double", "LastFrameTime": "DateTime", "LastResult": "String",
             "Frames": "Int64", "Anomalies": "Int64", "Dropped": "Int64", "Errors": "Int64", "Status": "String",
             "EngineId": "String", "Threshold": "Double"}
WAITING_MAX = 1000  # frames' values that may wait for the server thread; past it the oldest waiting are skipped
START_TIMEOUT_S = 30.0  # asyncua's server builds its standard address space (about a second) and binds
STOP_S = 0.5  # what close keeps of flush_timeout for stopping asyncua's server
CLOSE_GRACE_S = 0.5  # with clients connected, the final values get this long to be published before the server stops


@dataclass(frozen=True)
class OpcUaTarget:
    host: str
    port: int  # 0: any free one (picked when the server binds)
    path: str
    loopback: bool

    def url(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"opc.tcp://{host}:{self.port if port is None else port}{self.path}"


def parse_opcua_url(url: str) -> OpcUaTarget:
    """opc.tcp://HOST[:PORT][/PATH] (port 4840 when omitted, 0: any free one); UserError naming what is wrong."""
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme != "opc.tcp":
        raise UserError(f"--opcua {shown}: the URL must start with opc.tcp:// (opc.tcp://HOST:PORT)")
    if parts.username is not None or parts.password is not None:
        raise UserError(f"--opcua {shown}: no user in the URL; give --opcua-user and LINEFLOW_OPCUA_PASSWORD")
    url_port(parts, OPCUA_PORT, f"--opcua {shown}")  # refuses a port that is not a number
    port = OPCUA_PORT if parts.port is None else parts.port  # 0: any free one
    if parts.query or parts.fragment:
        raise UserError(f"--opcua {shown}: no query or fragment is understood")
    host = parts.hostname
    if not host:
        raise UserError(f"--opcua {shown}: no host (opc.tcp://127.0.0.1:4840 serves this machine, "
                        "opc.tcp://0.0.0.0:4840 every interface)")
    resolve(host, port, f"--opcua {shown}")
    return OpcUaTarget(host, port, parts.path, is_loopback(host))


def _free_port(host: str) -> int:
    """A port free now on `host`, for opc.tcp://HOST:0 (the server binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _FrameValues(NamedTuple):
    """One frame's values, as write() hands them to the server thread."""

    verdict: str
    scored: bool  # this frame has a score
    score: float | None  # the newest score so far (this frame's where scored)
    timestamp: float | None
    message: str
    frames: int
    anomalies: int
    dropped: int
    errors: int
    engine: str | None
    threshold: float | None


class _AsyncuaLog(logging.Handler):
    """asyncua's log records, kept off the run's stderr (a warning per client request, tracebacks): errors are
    counted and the first is said in one line; the rest is dropped."""

    def __init__(self, warn: Callable[[str], None]):
        super().__init__(logging.ERROR)
        self.warn, self.errors, self.quiet = warn, 0, True  # quiet while starting: a failed bind is told as a UserError

    def emit(self, record: logging.LogRecord) -> None:
        if self.quiet or record.getMessage().startswith("sending service fault"):  # a client's error, told to it
            return
        self.errors += 1
        if self.errors == 1:
            self.warn(f"opcua: asyncua reported an error ({one_line(record.getMessage())[:300]}); later ones are "
                      "counted in the summary")


class OpcUaSink:
    """Serve the run's newest verdict and counts as OPC UA variables (module docstring) at `url`.

    Construction checks the options, makes or loads the certificate where security is on, and starts the server,
    bound, before it returns (UserError: bad input, or the port in use). Counters a metrics exporter may read, plain
    ints: `frames` (results written), `coalesced` (frames whose values were skipped for a newer frame's), `waiting`
    (frames' values not yet in the address space), `clients` (connections open now), `refused` (clients refused for
    their user name or password)."""

    def __init__(self, url: str, camera: str = "camera", username: str | None = None, password: str | None = None,
                 cert_file: str | Path | None = None, key_file: str | Path | None = None,
                 cert_dir: str | Path | None = None, threshold: float | None = None, engine_id: str | None = None,
                 warn: Callable[[str], None] = warn_on_stderr, flush_timeout: float = FLUSH_TIMEOUT_S,
                 waiting_max: int = WAITING_MAX):
        self.target = target = parse_opcua_url(url)
        self.port = target.port or _free_port(target.host)  # the endpoint a client is told names the real port
        self.url = target.url(self.port)
        self.secure = username is not None or not target.loopback
        if not self.secure and (cert_file or key_file or password):
            raise UserError("--opcua-cert, --opcua-key and a password secure a server that has a user: give "
                            "--opcua-user too")
        if self.secure and not username:
            raise UserError(f"--opcua {self.url}: beyond loopback a user name and password are needed "
                            "(--opcua-user NAME, the password in LINEFLOW_OPCUA_PASSWORD): no anonymous access")
        if self.secure and not password:
            raise UserError(f"--opcua-user {username}: no password (LINEFLOW_OPCUA_PASSWORD, or --opcua-password)")
        try:
            import asyncua  # noqa: F401 - only with --opcua
        except ImportError:
            raise UserError("--opcua needs asyncua: pip install asyncua") from None
        self.camera = re.sub(r"[^A-Za-z0-9_-]+", "_", camera) or "camera"
        self.username, self.password = username, password
        self.certificate = self.key = None
        self.app_uri = f"urn:{socket.gethostname()}:lineflow"
        self.cert_path: Path | None = None
        if self.secure:
            folder = Path(cert_dir) if cert_dir is not None else default_certificate_dir()
            hosts = [socket.gethostname(), "localhost", target.host]
            self.certificate, self.key, self.app_uri, self.cert_path, made = server_certificate(
                cert_file, key_file, folder, self.app_uri, hosts)
            if made:
                warn(f"opcua: made a self-signed server certificate, {self.cert_path} (its key beside it); clients "
                     f"trust it by its SHA-1 thumbprint {self.thumbprint}")
        self.warn_to, self.flush_timeout, self.waiting_max = warn, flush_timeout, waiting_max
        self.threshold, self.engine_id = threshold, engine_id
        self.lock = threading.Lock()
        self.updates: deque = deque()  # _FrameValues and final status strings, oldest first
        self.frames = self.anomalies = self.dropped = self.errors = 0
        self.score: float | None = None  # the newest score
        self.coalesced = self.waiting = self.clients = self.refused = self.applied = 0
        self.closed = False
        self.log = _AsyncuaLog(self.warn)
        logging.getLogger("asyncua").addHandler(self.log)
        logging.getLogger("asyncua").propagate = False  # its warnings and tracebacks stay off the run's stderr
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._serve_thread, name="lineflow-opcua", daemon=True)
        self.thread.start()
        if not self.ready.wait(START_TIMEOUT_S):
            raise UserError(f"--opcua {self.url}: the server did not start within {START_TIMEOUT_S:g} s")
        if self.failure is not None:
            self.thread.join(5)
            logging.getLogger("asyncua").removeHandler(self.log)
            raise UserError(f"--opcua {self.url}: {self.failure}")
        self.log.quiet = False

    @property
    def thumbprint(self) -> str | None:
        """The server certificate's SHA-1 thumbprint (None: no security)."""
        return None if self.certificate is None else thumbprint(self.certificate)

    def description(self) -> str:
        """The start line: where, what, and how it is secured."""
        where = f"opcua: {self.url} Objects/lineflow/{self.camera} (namespace {NAMESPACE})"
        if not self.secure:
            return where + ", anonymous, no security (loopback only)"
        return (where + f", Basic256Sha256 SignAndEncrypt, user {self.username}, certificate {self.cert_path} "
                f"(SHA-1 {self.thumbprint})")

    def warn(self, text: str) -> None:
        try:
            self.warn_to(redact(text))
        except (OSError, ValueError):  # a stderr that is gone does not end the server's thread
            pass

    # the run's thread
    def write(self, result: Result) -> None:
        if result.status is Status.DROPPED:
            verdict, self.dropped = "dropped", self.dropped + 1
        elif result.error is not None:
            verdict, self.errors = "error", self.errors + 1
        else:
            verdict = "anomalous" if result.is_anomalous else "ok"
            self.anomalies += verdict == "anomalous"
        self.frames += 1
        if result.score is not None:
            self.score = result.score
        self._hand(_FrameValues(verdict, result.score is not None, self.score, result.timestamp,
                                json.dumps(result_message(result)), self.frames, self.anomalies, self.dropped,
                                self.errors, result.engine, result.threshold))

    def _hand(self, update) -> None:
        """Queue an update for the server thread, skipping the oldest waiting frame's past waiting_max; wake the
        thread when the queue was empty (otherwise it is draining and will find this one)."""
        with self.lock:
            if len(self.updates) >= self.waiting_max and isinstance(self.updates[0], _FrameValues):
                self.updates.popleft()
                self.coalesced += 1
            self.updates.append(update)
            self.waiting = len(self.updates)
            wake = self.waiting == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:  # the loop has ended (the server stopped): the values wait, counted as waiting
                pass

    # the server's thread
    def _serve_thread(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _start_server(self):
        from asyncua import Server, ua
        from asyncua.crypto.permission_rules import User, UserRole

        sink = self

        class Users:
            """Open (loopback, no user): every client a plain user. Secured: the one user name and password."""

            def get_user(self, iserver, username=None, password=None, certificate=None):
                if sink.username is None:
                    return User(role=UserRole.User)
                # `certificate` is the secure channel's client certificate: empty on an unsecured channel, which
                # asyncua opens for discovery whatever the endpoints; a session there would carry the password and
                # the values in clear
                if (certificate and username is not None and password is not None
                        and hmac.compare_digest(username.encode(), sink.username.encode())
                        & hmac.compare_digest(password.encode(), sink.password.encode())):
                    return User(role=UserRole.User, name=username)
                sink.refused += 1
                if sink.refused == 1:
                    sink.warn("opcua: refused a client: a wrong user name or password, or a channel without "
                              "Basic256Sha256 SignAndEncrypt (later ones are counted)")
                return None

        class SharedDataValue(ua.DataValue):
            """A value written once and never changed: asyncua deep-copies every value for every monitored item (a
            tenth of a millisecond each, most of the server's work per frame), here a copy of what cannot change."""

            def __deepcopy__(self, memo):
                return self

        self.DataValue = SharedDataValue
        server = Server(user_manager=Users())
        await server.init()
        server.set_server_name(f"lineflow {self.camera}")
        await server.set_application_uri(self.app_uri)
        server.product_uri = NAMESPACE
        server.allow_remote_admin(False)
        server.set_endpoint(self.url)
        if self.secure:
            from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
            await server.load_certificate(self.certificate.public_bytes(Encoding.DER), format="der")
            await server.load_private_key(self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
                                          format="pem")
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        idx = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_folder(ua.NodeId("lineflow", idx), ua.QualifiedName("lineflow", idx))
        camera = await folder.add_object(ua.NodeId(self.camera, idx), ua.QualifiedName(self.camera, idx))
        initial = {"Frames": 0, "Anomalies": 0, "Dropped": 0, "Errors": 0, "Status": "running",
                   "EngineId": self.engine_id, "Threshold": self.threshold}
        self.nodes, self.types, self.current = {}, {}, {}
        for name, type_name in VARIABLES.items():
            vtype = getattr(ua.VariantType, type_name)
            value = initial.get(name)
            node = await camera.add_variable(ua.NodeId(f"{self.camera}.{name}", idx), ua.QualifiedName(name, idx),
                                             ua.Variant(value, vtype if value is not None else ua.VariantType.Null),
                                             datatype=ua.NodeId(getattr(ua.ObjectIds, type_name)))
            self.nodes[name], self.types[name], self.current[name] = node.nodeid, vtype, value
        await server.start()
        return server

    async def _serve(self) -> None:
        try:
            server = await self._start_server()
        except OSError as e:
            why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or one_line(e))
            self.failure = f"cannot listen there ({why})"
        except Exception as e:  # noqa: BLE001 - asyncua's own refusal, said in one line by the constructor
            self.failure = f"the OPC UA server did not start ({one_line(e)})"
        if self.failure is not None:
            self.ready.set()
            return
        self.wake, self.stopping = asyncio.Event(), False
        self.last_stamp = datetime.now(UTC)
        self.ready.set()
        ticker = asyncio.ensure_future(self._tick(server))
        try:
            while not self.stopping:
                await self.wake.wait()
                self.wake.clear()
                await self._apply_waiting(server)
        except Exception as e:  # noqa: BLE001 - a bug here ends the server, never the run: said in one line
            self.warn(f"opcua: the server stopped ({type(e).__name__}: {one_line(e)}); the run goes on without it")
        finally:
            ticker.cancel()
            await server.stop()
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in left:  # asyncua's sessions' and subscriptions' loops outlive server.stop()
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    async def _tick(self, server) -> None:
        """Once a second: the connections open now (`clients`)."""
        while True:
            self.clients = len(server.iserver.asyncio_transports)
            await asyncio.sleep(1.0)

    async def _apply_waiting(self, server) -> None:
        while True:
            with self.lock:
                if not self.updates:
                    return
                update = self.updates.popleft()
                self.waiting = len(self.updates)
            if isinstance(update, _FrameValues):
                await self._apply(server, update)
                self.applied += 1
            else:  # the final status, from close()
                await self._write(server, {"Status": update}, self._stamp())

    def _stamp(self) -> datetime:
        """Now (UTC), later than every stamp before (a subscription's timestamp trigger tells frames apart)."""
        stamp = max(datetime.now(UTC), self.last_stamp + timedelta(microseconds=1))
        self.last_stamp = stamp
        return stamp

    async def _apply(self, server, v: _FrameValues) -> None:
        values = {"LastVerdict": v.verdict, "LastFrameTime": None if v.timestamp is None else
                  datetime.fromtimestamp(v.timestamp, UTC), "LastResult": v.message, "Frames": v.frames}
        if v.scored or v.score != self.current["LastScore"]:  # catches up where the scored frame was coalesced
            values["LastScore"] = v.score
        for name, value in (("Anomalies", v.anomalies), ("Dropped", v.dropped), ("Errors", v.errors),
                            ("EngineId", v.engine), ("Threshold", v.threshold)):
            if value is not None and value != self.current[name]:  # unchanged counts are not written again
                values[name] = value
        await self._write(server, values, self._stamp())

    async def _write(self, server, values: dict, stamp: datetime) -> None:
        from asyncua import ua
        for name, value in values.items():
            if value is None:
                continue
            self.current[name] = value
            await server.write_attribute_value(self.nodes[name], self.DataValue(
                ua.Variant(value, self.types[name]), SourceTimestamp=stamp, ServerTimestamp=stamp))

    # the end
    def summary(self) -> str:
        waiting = self.frames - self.applied - self.coalesced
        line = (f"opcua {self.url} Objects/lineflow/{self.camera}: {self.applied} of {self.frames} frames' values "
                f"served, {self.coalesced} skipped for newer ones (coalesced)")
        if waiting:
            line += f", {waiting} not served by the end"
        if self.refused:
            line += f"; {self.refused} clients refused (user name, password or channel)"
        if self.log.errors:
            line += f"; asyncua reported {self.log.errors} errors"
        return line

    def _stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def close(self, completed: bool = True) -> SinkSummary:
        """Write the final Status ("ended", or "stopped" after a failure or interruption), give connected clients
        CLOSE_GRACE_S to be told, stop the server: all within flush_timeout; idempotent, thread-safe beside other
        sinks' closes."""
        if self.closed:
            return SinkSummary(self.summary())
        self.closed = True
        end = time.monotonic() + self.flush_timeout
        self._hand("ended" if completed else "stopped")
        deadline = end - STOP_S
        while self.waiting and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.clients and not self.waiting:
            time.sleep(max(0.0, min(CLOSE_GRACE_S, deadline - time.monotonic())))
        try:
            self.loop.call_soon_threadsafe(self._stop)  # the server thread stops once it has written what it took
        except RuntimeError:  # its loop has ended already
            pass
        self.thread.join(max(0.0, end - time.monotonic()))  # past it the daemon thread is left to the process's end
        logging.getLogger("asyncua").removeHandler(self.log)
        return SinkSummary(self.summary())
