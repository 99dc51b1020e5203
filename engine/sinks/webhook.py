"""Webhooks: an HTTP POST of the frame's message per anomalous frame (or every frame), from the sink's own
thread through a bounded queue, with a timeout and retries; a slow or absent receiver never stalls the run.

Whatever one POST meets (a refused connection, a timeout, a malformed reply that http.client raises on) is a
failed attempt of that message, retried with backoff; the sender thread itself never ends before close. A
redirect (3xx) is never followed: urllib would turn the POST into a body-less GET to wherever it points,
forwarding the headers, and count that GET's 200 as a delivery. It is a failed delivery, not retried (the
receiver would answer the same), with a warning naming the status and where it pointed. A URL's USER:PASSWORD@
is sent as HTTP Basic authentication (urllib alone would take it for part of the host name). Every line the
sink prints names the URL with its password hidden (engine.common.redact).
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote, urlsplit, urlunsplit

from engine.common.errors import UserError, one_line
from engine.common.net import resolve, url_port
from engine.common.redact import redact
from engine.results import Result
from engine.sinks.base import FLUSH_TIMEOUT_S, SinkSummary, result_message, warn_on_stderr

__all__ = ["WebhookSink"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx comes back as an HTTPError instead of being followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Redirected(Exception):
    """The receiver answered a POST with a redirect: a failed delivery, not worth a retry."""


class WebhookSink:
    """An HTTP POST (JSON: the frame's message) per anomalous frame, or per frame with `every_frame`; from its own
    thread with a timeout and retries, through a bounded queue (past it the oldest waiting message is dropped
    and counted). Construction checks the URL and resolves the host (UserError)."""

    def __init__(self, url: str, every_frame: bool = False, timeout: float = 2.0, retries: int = 3,
                 queue_limit: int = 1000, headers: dict | None = None, warn: Callable[[str], None] = warn_on_stderr,
                 flush_timeout: float = FLUSH_TIMEOUT_S):
        self.label = redact(url)  # the URL as every message names it
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--webhook {self.label}: the URL must be http:// or https:// with a host")
        resolve(parts.hostname, url_port(parts, 443 if parts.scheme == "https" else 80, f"--webhook {self.label}"),
                "--webhook")
        if timeout <= 0 or retries < 0 or queue_limit < 1:
            raise UserError("--webhook-timeout must be positive, retries >= 0, the queue at least 1")
        self.every_frame, self.timeout, self.retries, self.warn_to = every_frame, timeout, retries, warn
        self.flush_timeout = flush_timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "lineflow"}
        self.url = url
        if parts.username is not None:  # USER:PASSWORD@ as Basic authentication, the URL without them
            self.url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        self.headers.update(headers or {})
        self.opener = urllib.request.build_opener(_NoRedirect)
        self.queue: deque = deque()
        self.queue_limit = queue_limit
        self.cond = threading.Condition()
        self.sent = self.failed = self.dropped = self.attempts = self.unsent = 0
        self.busy, self.closing = False, False
        self.warned: str | None = None  # the problem last said (said again only when it changes, or after a success)
        self.abandoned = False  # close gave up on the POST in flight and counted it as not sent
        self.given_up = threading.Event()  # close has given up: no more retries of the POST in flight
        self.thread = threading.Thread(target=self._serve, name="lineflow-webhook", daemon=True)
        self.thread.start()

    def write(self, result: Result) -> None:
        if not (self.every_frame or result.is_anomalous):
            return
        body = json.dumps(result_message(result)).encode()
        with self.cond:
            if len(self.queue) >= self.queue_limit:
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(body)
            self.cond.notify()

    def _attempt(self, body: bytes) -> None:
        """One POST; returns on a 2xx, raises on anything else (_Redirected on a 3xx)."""
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.timeout):
                return
        except urllib.error.HTTPError as e:
            with e:
                if 300 <= e.code < 400:  # the Location on one line, bounded: it is the receiver's text
                    where = " ".join(str(e.headers.get("Location", "(no Location)")).split())[:300]
                    raise _Redirected(f"HTTP {e.code} redirect to {where}; "
                                      "redirects are not followed, so the message is not delivered (point --webhook "
                                      "at the final URL)") from None
                raise

    def warn(self, text: str) -> None:
        """A warning, its URLs redacted (a reason may quote one: a redirect's Location, urllib's); a stderr that is
        gone does not end the sender thread."""
        try:
            self.warn_to(redact(text))
        except (OSError, ValueError):
            pass

    def _say(self, why: str, retrying: bool) -> None:
        if why != self.warned:
            self.warned = why
            self.warn(f"webhook {self.label}: {why}" + (f"; retrying ({self.retries} retries per message)"
                                                        if retrying else ""))

    def _post(self, body: bytes) -> bool:
        for attempt in range(self.retries + 1):
            if attempt and self.given_up.wait(min(0.25 * 2 ** attempt, 2.0)):
                return False
            self.attempts += 1
            try:
                self._attempt(body)
                return True
            except _Redirected as e:
                self._say(str(e), retrying=False)
                return False
            except urllib.error.HTTPError as e:
                self._say(f"HTTP {e.code} {e.reason}", retrying=True)
            except urllib.error.URLError as e:
                self._say(str(e.reason), retrying=True)
            except http.client.HTTPException as e:  # BadStatusLine, LineTooLong, IncompleteRead, ...
                self._say(f"a malformed HTTP reply ({one_line(e)})", retrying=True)
            except Exception as e:  # noqa: BLE001 - whatever else one POST meets, it failed; the thread goes on
                self._say(one_line(e), retrying=True)
        return False

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                body = self.queue.popleft()
                self.busy = True
            try:
                ok = self._post(body)
            except Exception as e:  # noqa: BLE001 - a bug here must not end the thread (every later POST would wait)
                ok = False
                self.warn(f"webhook {self.label}: internal error ({one_line(e)}); the message is not delivered")
            with self.cond:
                self.busy = False
                if self.abandoned:  # close already counted it, and has reported
                    self.abandoned = False
                elif ok:
                    self.sent += 1
                    self.warned = None
                else:
                    self.failed += 1
                self.cond.notify_all()

    @property
    def undelivered(self) -> int:
        return self.failed + self.dropped + self.unsent + len(self.queue) + self.busy

    def summary(self) -> str:
        return (f"webhook {self.label}: {self.sent} delivered, {self.failed} failed after retries, {self.dropped} "
                f"dropped (queue full), {self.unsent + len(self.queue) + self.busy} not sent")

    def close(self, completed: bool = True) -> SinkSummary:
        """Send what waits, for up to `flush_timeout` s; then report what was not delivered."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            deadline = time.monotonic() + self.flush_timeout
            while (self.queue or self.busy) and time.monotonic() < deadline:
                self.cond.wait(0.05)
            self.unsent += len(self.queue) + self.busy  # given up: the thread ends after its current POST
            self.queue.clear()
            self.abandoned, self.busy = self.busy, False
        self.given_up.set()
        self.thread.join(0.1)
        return SinkSummary(self.summary(), self.undelivered)
