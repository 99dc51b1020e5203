"""Webhooks: an HTTP POST of the frame's message per anomalous frame (or every frame), from the sink's own
thread through a bounded queue, with a timeout and retries; a slow or absent receiver never stalls the run."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from engine.common.errors import UserError
from engine.common.net import resolve, url_port
from engine.results import Result
from engine.sinks.base import FLUSH_TIMEOUT_S, SinkSummary, result_message, warn_on_stderr

__all__ = ["WebhookSink"]


class WebhookSink:
    """An HTTP POST (JSON: the frame's message) per anomalous frame, or per frame with `every_frame`; from its own
    thread with a timeout and retries, through a bounded queue (past it the oldest waiting message is dropped
    and counted). Construction checks the URL and resolves the host (UserError)."""

    def __init__(self, url: str, every_frame: bool = False, timeout: float = 2.0, retries: int = 3,
                 queue_limit: int = 1000, headers: dict | None = None, warn: Callable[[str], None] = warn_on_stderr,
                 flush_timeout: float = FLUSH_TIMEOUT_S):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--webhook {url}: the URL must be http:// or https:// with a host")
        resolve(parts.hostname, url_port(parts, 443 if parts.scheme == "https" else 80, f"--webhook {url}"),
                "--webhook")
        if timeout <= 0 or retries < 0 or queue_limit < 1:
            raise UserError("--webhook-timeout must be positive, retries >= 0, the queue at least 1")
        self.url, self.every_frame, self.timeout, self.retries, self.warn = url, every_frame, timeout, retries, warn
        self.flush_timeout = flush_timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "lineflow", **(headers or {})}
        self.queue: deque = deque()
        self.queue_limit = queue_limit
        self.cond = threading.Condition()
        self.sent = self.failed = self.dropped = self.attempts = self.unsent = 0
        self.busy, self.closing, self.failing = False, False, False
        self.abandoned = False  # close gave up on the POST in flight and counted it as not sent
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

    def _post(self, body: bytes) -> bool:
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2 ** attempt, 2.0))
            self.attempts += 1
            try:
                request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    if 200 <= response.status < 300:
                        return True
            except (urllib.error.URLError, OSError, ValueError) as e:
                why = getattr(e, "reason", None) or e
                if not self.failing:
                    self.failing = True
                    self.warn(f"webhook {self.url}: {why}; retrying ({self.retries} retries per message)")
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
            ok = self._post(body)
            with self.cond:
                self.busy = False
                if self.abandoned:  # close already counted it, and has reported
                    self.abandoned = False
                elif ok:
                    self.sent += 1
                    self.failing = False
                else:
                    self.failed += 1
                self.cond.notify_all()

    @property
    def undelivered(self) -> int:
        return self.failed + self.dropped + self.unsent + len(self.queue) + self.busy

    def summary(self) -> str:
        return (f"webhook {self.url}: {self.sent} delivered, {self.failed} failed after retries, {self.dropped} "
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
        self.thread.join(0.1)
        return SinkSummary(self.summary(), self.undelivered)
