"""The live view: a page in the browser showing what the line sees (Starlette on uvicorn, in its own thread).

`LiveView.write(result)` only keeps references and counters (a few microseconds under a lock): the
overlay is drawn and JPEG-encoded in the server's threads, at most `max_fps` times a second and only
while a page asks, so a viewer never holds back inference. The page long-polls `/frame.jpg?after=SEQ`:
each answer is the newest overlay, so a slow browser gets fewer frames, never a backlog. It also polls
`/stats.json` (counters, frames/s, latency p50/p99, drops, errors, the scores and the threshold) and
shows the last anomalous frames (`/anomaly/N.jpg`).

It binds 127.0.0.1 unless told otherwise; bound to any other address it requires a token (given, or
made up and printed with the page's URL), checked on every request (`?token=` or a Bearer header).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import re
import secrets
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from importlib.resources import files

import numpy as np

from engine.common.errors import UserError
from engine.results import Result
from engine.sinks.base import SinkSummary
from engine.sinks.overlay import overlay

__all__ = ["LiveView", "parse_view_address"]

VIEW_FPS = 8.0  # overlays per second at most, for all viewers together
VIEW_SIDE = 720  # the overlay's longer side at most, in pixels
SCORES_KEPT = 2000  # points of the score plot
ANOMALIES_KEPT = 12
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")


def parse_view_address(text: str) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); host 127.0.0.1 when omitted."""
    host, _, port = str(text).rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--view {text}: expected [HOST:]PORT, the port a number from 0 to 65535")
    return host, int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--view {host}:{port}: cannot resolve host {host!r} ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise UserError(f"--view {host}:{port}: cannot listen there ({why})") from None
    sock.set_inheritable(True)
    return sock


class LiveView:
    """Serve the run at http://HOST:PORT/; `write` every result, `close` at the end: after a completed run it keeps
    serving `hold` seconds (None: until Ctrl-C or SIGTERM), so a finished run can be reviewed."""

    def __init__(self, address: str = "127.0.0.1:8080", threshold: float = 1.0, token: str | None = None,
                 stats=None, title: str = "lineflow", max_fps: float = VIEW_FPS, hold: float | None = 0.0):
        host, port = parse_view_address(address)
        if token is not None and not TOKEN_PATTERN.fullmatch(token):
            raise UserError("--view-token: 16 to 128 characters of A-Z, a-z, 0-9, '_' and '-'")
        if token is None and not _loopback(host):
            token = secrets.token_urlsafe(18)  # bound beyond this machine: never without a token
        self.token, self.threshold, self.stats, self.title, self.period = token, threshold, stats, title, 1 / max_fps
        self.hold = hold
        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/" + (f"?token={token}" if token else "")
        self.lock = threading.Lock()
        self.seq, self.latest, self.finished = 0, None, False
        self.passed = self.failed = self.errors = 0
        self.scores: deque = deque(maxlen=SCORES_KEPT)
        self.anomalies: deque = deque(maxlen=ANOMALIES_KEPT)
        self.jpeg_cache: tuple[int, bytes] | None = None
        self.last_encode = 0.0  # time.monotonic() of the last JPEG encoding (at most max_fps a second)
        self.anomaly_cache: dict[int, bytes] = {}
        self.served = 0
        self._start()

    # the sink side (the run's thread)
    def write(self, result: Result) -> None:
        with self.lock:
            if result.error is not None:
                self.errors += 1
                return
            self.passed += not result.is_anomalous
            self.failed += bool(result.is_anomalous)
            self.scores.append((result.index, round(float(result.score), 5), bool(result.is_anomalous)))
            if result.frame is not None and result.anomaly_map is not None:
                self.seq += 1
                self.latest = (self.seq, result)
                if result.is_anomalous:
                    self.anomalies.append((self.seq, result))

    # the server side (uvicorn's thread and its workers)
    def _overlay_jpeg(self, result: Result, side: int = VIEW_SIDE, quality: int = 80) -> bytes:
        import cv2
        h, w = result.frame.shape[:2]
        scale = min(1.0, side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            result = replace(result, frame=cv2.resize(result.frame, size, interpolation=cv2.INTER_AREA),
                             anomaly_map=cv2.resize(result.anomaly_map, size, interpolation=cv2.INTER_AREA))
        rgb = overlay(result, self.threshold)
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        return data.tobytes()

    def _stats(self) -> dict:
        s = self.stats
        with self.lock:
            out = {"title": self.title, "threshold": self.threshold, "passed": self.passed, "failed": self.failed,
                   "errors": self.errors, "seq": self.seq, "finished": self.finished, "scores": list(self.scores),
                   "anomalies": [{"id": seq, "index": r.index, "source": r.source, "score": r.score}
                                 for seq, r in self.anomalies]}
        if s is not None:
            p50, p99 = s.latency_ms(50), s.latency_ms(99)
            out.update({"frames_per_s": round(s.fps(), 2), "frames": s.frames, "dropped": s.dropped,
                        "latency_p50_ms": None if p50 != p50 else round(p50, 1),
                        "latency_p99_ms": None if p99 != p99 else round(p99, 1)})
        return out

    def _app(self):
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse, JSONResponse, Response
        from starlette.routing import Route

        page = files("engine.sinks").joinpath("view.html").read_text()
        encode_lock = asyncio.Lock()

        def allowed(request) -> bool:
            if self.token is None:
                return True
            given = request.query_params.get("token") or request.headers.get("authorization", "")[7:]
            return hmac.compare_digest(given.encode(), self.token.encode())

        def denied() -> Response:
            return Response("a valid token is needed (?token=...)\n", status_code=401, media_type="text/plain")

        async def index(request):
            if not allowed(request):
                return denied()
            return HTMLResponse(page.replace("{{TITLE}}", self.title).replace("{{TOKEN}}", self.token or ""),
                                headers={"Cache-Control": "no-store"})

        async def stats(request):
            return JSONResponse(self._stats()) if allowed(request) else denied()

        async def frame(request):
            if not allowed(request):
                return denied()
            after = int(request.query_params.get("after", "0") or 0)
            deadline = time.monotonic() + 10.0
            while self.seq <= after and time.monotonic() < deadline and not self.finished:
                await asyncio.sleep(0.02)
            async with encode_lock:  # one encoding at a time, at most max_fps a second, shared by all viewers
                latest = self.latest
                if latest is None:
                    return Response(status_code=204)
                seq, result = latest
                if self.jpeg_cache is None or self.jpeg_cache[0] != seq:
                    wait = self.period - (time.monotonic() - self.last_encode)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    seq, result = self.latest
                    self.jpeg_cache = (seq, await asyncio.to_thread(self._overlay_jpeg, result))
                    self.last_encode = time.monotonic()
                    self.served += 1
                seq, data = self.jpeg_cache
            return Response(data, media_type="image/jpeg", headers={"X-Seq": str(seq), "Cache-Control": "no-store"})

        async def anomaly(request):
            if not allowed(request):
                return denied()
            key = int(request.path_params["key"])
            if key not in self.anomaly_cache:
                found = [r for seq, r in list(self.anomalies) if seq == key]
                if not found:
                    return Response(status_code=404)
                self.anomaly_cache[key] = await asyncio.to_thread(self._overlay_jpeg, found[0], 320, 75)
                for old in [k for k in self.anomaly_cache if k < key - 4 * ANOMALIES_KEPT]:
                    del self.anomaly_cache[old]
            return Response(self.anomaly_cache[key], media_type="image/jpeg",
                            headers={"Cache-Control": "max-age=3600"})

        return Starlette(routes=[Route("/", index), Route("/stats.json", stats), Route("/frame.jpg", frame),
                                 Route("/anomaly/{key:int}.jpg", anomaly)])

    def _start(self) -> None:
        import uvicorn
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="lineflow-view", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, completed: bool = True) -> SinkSummary:
        """Stop serving: after a completed run `hold` seconds first; at once after a failed or interrupted one."""
        with self.lock:
            if self.finished:
                return SinkSummary()
            self.finished = True
        hold = self.hold if completed else 0.0
        if hold is None or hold > 0:
            print(f"view: the run has ended; still serving {self.url} "
                  + ("until Ctrl-C" if hold is None else f"for {hold:g} s"), file=sys.stderr, flush=True)
            try:
                end = None if hold is None else time.monotonic() + hold
                while self.thread.is_alive() and (end is None or time.monotonic() < end):
                    time.sleep(0.2)
            except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) ends the review: a normal end of the run
                pass
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()
        return SinkSummary()

