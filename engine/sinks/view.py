"""The live view: a page in the browser showing what the line sees (Starlette on uvicorn, in its own thread).

`LiveView.write(result)` only keeps references and counters (a few microseconds under a lock): the
overlay is drawn and JPEG-encoded in the server's threads, at most `max_fps` times a second and only
while a page asks, so a viewer never holds back inference. The page long-polls `/frame.jpg?after=SEQ`:
each answer is the newest overlay, so a slow browser gets fewer frames, never a backlog. It also polls
`/stats.json` (counters, frames/s, latency p50/p99, drops, errors, the scores and the threshold) and
shows the last anomalous frames (`/anomaly/N.jpg`), and a banner while the newest result reports drift. The
threshold shown is the newest result's (an engine swapped mid-run brings its own).

With a review folder (engine.run --review DIR) it also serves `/review`: each queued frame's overlay with two
buttons that label it good or defect (a JSON POST to `/review/label`, written by engine.review_store.append_labels,
who = "view"). A label changes a file, so that POST also needs a JSON body (a plain cross-site form cannot send
one) and, where the browser names its origin, this server's own.

It binds 127.0.0.1 unless told otherwise; bound to any other address it requires a token (given, or
made up and printed with the page's URL), checked on every request (`?token=` or a Bearer header).
Bound to loopback it answers only requests whose Host names loopback (localhost, 127.0.0.0/8, ::1; any
port, so an SSH tunnel's works): a web page whose name an attacker rebinds to 127.0.0.1 (DNS rebinding)
sends its own name and gets 421 Misdirected Request. Beyond loopback there is no Host check (the box may
be reached by any name or address, through NAT or a proxy); the token, which such a page cannot know,
guards it. The camera name is HTML-escaped where it lands in a page, and sources' URLs are redacted.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import html
import re
import secrets
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from engine.common.errors import OutputError, UserError
from engine.common.net import is_loopback, loopback_host_header, parse_listen_address
from engine.common.redact import redact
from engine.results import Result
from engine.review_store import ID_PATTERN, append_labels, read_labels, read_queue
from engine.sinks.base import SinkSummary
from engine.sinks.overlay import overlay

__all__ = ["LiveView", "parse_view_address"]

VIEW_FPS = 8.0  # overlays per second at most, for all viewers together
VIEW_SIDE = 720  # the overlay's longer side at most, in pixels
SCORES_KEPT = 2000  # points of the score plot
ANOMALIES_KEPT = 12
REVIEW_SIDE = 480  # the review page's overlays, longer side at most
REVIEW_THUMBNAILS_KEPT = 256
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")


def parse_view_address(text: str) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); host 127.0.0.1 when omitted."""
    return parse_listen_address(text, "--view")


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


def _fill(page: str, title: str, token: str | None) -> str:
    """A page with its token (A-Z, a-z, 0-9, '_', '-': safe in a JS string) and the camera name, HTML-escaped."""
    return page.replace("{{TOKEN}}", token or "").replace("{{TITLE}}", html.escape(title))


def _loopback_only(app):
    """`app` behind a Host check: a request whose Host does not name loopback gets 421 (every path, before routing).
    421 Misdirected Request says what is wrong (this server does not answer to that name), where 403 would read
    as a missing permission."""
    from starlette.responses import PlainTextResponse

    async def checked(scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not loopback_host_header(host):
                refusal = PlainTextResponse("this view answers to localhost, 127.0.0.1 and [::1] only\n",
                                            status_code=421)
                await refusal(scope, receive, send)
                return
        await app(scope, receive, send)

    return checked


class LiveView:
    """Serve the run at http://HOST:PORT/; `write` every result, `close` at the end: after a completed run it keeps
    serving `hold` seconds (None: until Ctrl-C or SIGTERM), so a finished run can be reviewed."""

    def __init__(self, address: str = "127.0.0.1:8080", threshold: float = 1.0, token: str | None = None,
                 stats=None, title: str = "lineflow", max_fps: float = VIEW_FPS, hold: float | None = 0.0,
                 review_dir: str | Path | None = None):
        host, port = parse_view_address(address)
        if token is not None and not TOKEN_PATTERN.fullmatch(token):
            raise UserError("--view-token: 16 to 128 characters of A-Z, a-z, 0-9, '_' and '-'")
        if token is None and not is_loopback(host):
            token = secrets.token_urlsafe(18)  # bound beyond this machine: never without a token
        self.token, self.threshold, self.stats, self.title, self.period = token, threshold, stats, title, 1 / max_fps
        self.host_checked = is_loopback(host)  # loopback: answer only to loopback names (DNS rebinding)
        self.hold = hold
        self.review_dir = None if review_dir is None else Path(review_dir)  # None: no review page
        self.drift: list[str] | None = None  # the newest result's drift kinds (None: not watched)
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
            if result.threshold is not None:  # the engine may be swapped mid-run: show the one judging now
                self.threshold = result.threshold
            if result.drift is not None:
                self.drift = list(result.drift)
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
                   "drift": self.drift, "review": self.review_dir is not None,
                   "anomalies": [{"id": seq, "index": r.index, "source": redact(str(r.source)), "score": r.score}
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
            return HTMLResponse(_fill(page, self.title, self.token), headers={"Cache-Control": "no-store"})

        async def stats(request):
            return JSONResponse(self._stats()) if allowed(request) else denied()

        async def frame(request):
            if not allowed(request):
                return denied()
            try:
                after = int(request.query_params.get("after", "0") or 0)
            except ValueError:  # a request's junk is its own problem, not a traceback on the run's stderr
                return Response("after=SEQ: a whole number\n", status_code=400, media_type="text/plain")
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

        routes = [Route("/", index), Route("/stats.json", stats), Route("/frame.jpg", frame),
                  Route("/anomaly/{key:int}.jpg", anomaly)]
        app = Starlette(routes=routes + (self._review_routes(allowed, denied) if self.review_dir else []))
        return _loopback_only(app) if self.host_checked else app

    def _review_thumbnail(self, name: str, side: int = REVIEW_SIDE) -> bytes:
        """A queued overlay PNG as a JPEG of at most `side` pixels."""
        import cv2
        image = cv2.imread(str(self.review_dir / name), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(name)
        h, w = image.shape[:2]
        scale = min(1.0, side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()

    def _review_items(self) -> list[dict]:
        labels = read_labels(self.review_dir)
        return [{"id": e.id, "index": e.index, "source": redact(str(e.source)), "score": e.score,
                 "is_anomalous": e.is_anomalous, "label": labels[e.id].label if e.id in labels else None}
                for e in read_queue(self.review_dir)]

    def _review_routes(self, allowed, denied) -> list:
        """/review (the page), /review.json (the queue with its labels), /review/ID.jpg (an overlay), POST
        /review/label ({"id", "label"}): every one behind the token."""
        from starlette.responses import HTMLResponse, JSONResponse, Response
        from starlette.routing import Route

        page = files("engine.sinks").joinpath("review.html").read_text()
        thumbnails: dict[str, bytes] = {}

        async def review(request):
            if not allowed(request):
                return denied()
            return HTMLResponse(_fill(page, self.title, self.token), headers={"Cache-Control": "no-store"})

        async def queue(request):
            if not allowed(request):
                return denied()
            return JSONResponse({"title": self.title, "items": await asyncio.to_thread(self._review_items)},
                                headers={"Cache-Control": "no-store"})

        async def thumbnail(request):
            if not allowed(request):
                return denied()
            key = request.path_params["key"]
            if key not in thumbnails:
                found = [e for e in await asyncio.to_thread(read_queue, self.review_dir) if e.id == key]
                try:
                    thumbnails[key] = await asyncio.to_thread(self._review_thumbnail, found[0].overlay)
                except (IndexError, FileNotFoundError):
                    return Response(status_code=404)
                while len(thumbnails) > REVIEW_THUMBNAILS_KEPT:
                    del thumbnails[next(iter(thumbnails))]
            return Response(thumbnails[key], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

        async def label(request):
            if not allowed(request):
                return denied()
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse({"error": "a label comes from this view's own page"}, status_code=403)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return JSONResponse({"error": "send the label as JSON"}, status_code=415)
            try:
                body = await request.json()
                key, value = body["id"], body["label"]
                if not isinstance(key, str) or not ID_PATTERN.fullmatch(key):
                    raise ValueError(f"bad id {key!r}")
            except (ValueError, KeyError, TypeError) as e:
                return JSONResponse({"error": f"expected {{\"id\": ..., \"label\": \"good\" | \"defect\"}} ({e})"},
                                    status_code=400)
            try:
                written = await asyncio.to_thread(append_labels, self.review_dir, [key], value, "view")
            except UserError as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            except OutputError as e:
                return JSONResponse({"error": str(e)}, status_code=500)
            return JSONResponse({"id": key, "label": written[0].label, "when": written[0].when})

        return [Route("/review", review), Route("/review.json", queue), Route("/review/{key}.jpg", thumbnail),
                Route("/review/label", label, methods=["POST"])]

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

