"""Prometheus metrics of a run (--metrics [HOST:]PORT): what the line did, served at http://HOST:PORT/metrics.

`MetricsSink.write(result)` only counts (plain integers and a bucket index, under a lock held for
microseconds); the text Prometheus reads is made at scrape time by a collector (prometheus_client's custom
collector) on the sink's own registry, from the sink's own HTTP server thread, so a scraper never holds
back the line and several runs (tests) can live in one process. It binds 127.0.0.1 unless told otherwise;
bound to loopback it answers only requests whose Host names loopback (DNS rebinding, as the live view).
Beyond loopback it serves anyone who can reach it: read-only numbers, no frames, no URLs, no secrets.

Every metric carries `camera` (engine.run --camera-name, else the name taken from --source), so one
Prometheus scrapes many lines. The names (stable; `_total` counters only grow during a run):

    lineflow_frames_total                    results (JSONL lines): scored + dropped + errors
    lineflow_scored_total                    frames scored (a verdict)
    lineflow_anomalies_total                 scored frames above the threshold
    lineflow_dropped_total                   frames dropped unscored: by the drop-oldest policy, or lost by the
                                             source (a GenICam camera's skipped frame ids)
    lineflow_errors_total{kind}              frames not scored, by kind (ERROR_KINDS: every kind present from the
                                             start, at 0; drops are not errors, as in the run's summary line)
    lineflow_latency_seconds                 histogram: capture to result, scored frames (LATENCY_BUCKETS_S)
    lineflow_score                           histogram: the scores, buckets around the threshold at the start
                                             (score_buckets: one edge is the threshold itself)
    lineflow_threshold                       the threshold the newest result was judged against
    lineflow_frames_per_second               scored frames per second over the last RATE_WINDOW_S seconds
    lineflow_last_result_timestamp_seconds   Unix time of the newest result (a stalled line: time() - it)
    lineflow_engine_info{engine_id,backend,precision}   1; engine_id the newest result's (changes at a swap)
    lineflow_sink_waiting{sink}              messages waiting for their receiver (sink: mqtt, webhook, opcua)
    lineflow_sink_delivered_total{sink}      messages the receiver took (MQTT: acknowledged; webhook: 2xx)
    lineflow_sink_lost_total{sink}           messages that never will be delivered (queue full, refused, failed)
"""

from __future__ import annotations

import bisect
import errno
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from engine.common.errors import UserError, one_line
from engine.common.net import is_loopback, loopback_host_header, parse_listen_address
from engine.results import Result, ScoringEngine, Status
from engine.sinks.base import SinkSummary, warn_on_stderr

__all__ = ["MetricsSink", "Delivery", "parse_metrics_address", "error_kind", "score_buckets", "ERROR_KINDS",
           "LATENCY_BUCKETS_S", "RATE_WINDOW_S"]

# a frame's error text -> its kind, the first prefix that matches (engine.stream, engine.sources, engine.genicam,
# engine.remote and engine.results word them): "bad_frame" a frame the preprocessing refused, or an image file that
# cannot be read (its text starts with its path); "incomplete" a GenICam frame with lost packets; "backend" the
# backend failed; "source" a camera or stream lost, reconnecting; "server" a Triton server's failure (--server);
# "non_finite" a NaN or infinite score or threshold; "other" anything else
ERROR_PREFIXES = (("bad frame", "bad_frame"), ("incomplete frame", "incomplete"), ("backend error", "backend"),
                  ("no frame from", "source"), ("camera lost", "source"), ("server", "server"),
                  ("non-finite", "non_finite"))
ERROR_KINDS = ("bad_frame", "incomplete", "backend", "source", "server", "non_finite", "other")
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# score bucket edges: threshold * factor for a positive threshold (threshold + |threshold| * (factor - 1) for any, 1
# for a threshold of 0): good parts score far below it (docs/model.md: BSD's median 0.09 against 0.57), defects above
SCORE_FACTORS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
RATE_WINDOW_S = 10.0  # lineflow_frames_per_second: scored frames over this many seconds


def parse_metrics_address(text: str) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); host 127.0.0.1 when omitted."""
    return parse_listen_address(text, "--metrics")


def error_kind(result: Result) -> str:
    """The kind of an unscored, undropped result's error (one of ERROR_KINDS)."""
    text = result.error or ""
    for prefix, kind in ERROR_PREFIXES:
        if text.startswith(prefix):
            return kind
    if result.source and text.startswith(f"{result.source}:"):  # engine.sources: an image file that cannot be read
        return "bad_frame"
    return "other"


def score_buckets(threshold: float) -> tuple[float, ...]:
    """Histogram edges around the threshold: from 0.05 to 5 times it for a positive threshold (SCORE_FACTORS), the
    threshold itself one edge (so le=threshold counts the frames that passed)."""
    if threshold != threshold or abs(threshold) == float("inf"):
        threshold = 1.0
    scale = abs(threshold) or 1.0
    return tuple(sorted({float(f"{threshold + scale * (k - 1):.6g}") if k != 1 else threshold for k in SCORE_FACTORS}))


@dataclass(frozen=True)
class Delivery:
    """What a message sink has waiting, delivered and lost: a sink that wants its numbers on /metrics offers
    `delivery() -> Delivery` (MqttSink and WebhookSink are read here from their counters)."""

    sink: str  # the label: mqtt, webhook, opcua
    waiting: int
    delivered: int
    lost: int


def _delivery(sink) -> Delivery | None:
    from engine.sinks.mqtt import MqttSink
    from engine.sinks.opcua import OpcUaSink
    from engine.sinks.webhook import WebhookSink
    if isinstance(sink, OpcUaSink):  # frames' values not yet in the address space; applied; skipped for newer ones
        return Delivery("opcua", sink.waiting, sink.applied, sink.coalesced)
    if isinstance(sink, MqttSink):  # pending: not yet acknowledged (in flight or held through an outage)
        return Delivery("mqtt", sink.pending, sink.acked, sink.dropped)
    if isinstance(sink, WebhookSink):
        return Delivery("webhook", len(sink.queue) + sink.busy, sink.sent, sink.failed + sink.dropped + sink.unsent)
    offered = getattr(sink, "delivery", None)
    return offered() if callable(offered) else None


class _Histogram:
    """Counts per bucket (not cumulative) and the sum: one bisect per observation."""

    def __init__(self, edges: tuple[float, ...]):
        self.edges, self.counts, self.sum = edges, [0] * (len(edges) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.edges, value)] += 1  # le: value <= edge
        self.sum += value

    def buckets(self) -> tuple[list[tuple[str, int]], float]:
        total, out = 0, []
        for edge, n in zip((*map(repr, self.edges), "+Inf"), self.counts):
            total += n
            out.append((edge, total))
        return out, self.sum


class MetricsSink:
    """Count every result; serve the counts at http://HOST:PORT/metrics from a thread of its own. Construction
    parses the address and binds the port (UserError: a bad address, a host that does not resolve, a port in use).
    `sinks`: the run's message sinks, whose waiting, delivered and lost messages are read at each scrape."""

    def __init__(self, address: str, camera: str, engine: ScoringEngine, sinks: list | tuple = ()):
        from prometheus_client import CollectorRegistry
        host, port = parse_metrics_address(address)
        self.camera, self.engine, self.sinks = camera, engine, list(sinks)
        self.lock = threading.Lock()
        self.frames = self.scored = self.anomalies = self.dropped = 0
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.latency = _Histogram(LATENCY_BUCKETS_S)
        self.scores = _Histogram(score_buckets(engine.threshold))
        self.threshold, self.engine_id = engine.threshold, engine.engine_id
        self.last_time: float | None = None
        self.recent: deque = deque()  # perf_counter of the scored frames of the last RATE_WINDOW_S
        self.started = time.perf_counter()
        self.scrapes = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.server = self._serve(host, port)
        self.port = self.server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="lineflow-metrics", daemon=True)
        self.thread.start()
        self.closed = False

    # the sink side (the run's thread)
    def write(self, result: Result) -> None:
        now = time.perf_counter()
        with self.lock:
            self.frames += 1
            self.last_time = time.time()
            if result.engine is not None:
                self.engine_id = result.engine
            if result.threshold is not None:
                self.threshold = result.threshold
            if result.status is Status.OK:
                self.scored += 1
                self.anomalies += bool(result.is_anomalous)
                self.scores.observe(result.score)
                if result.captured_perf:
                    self.latency.observe(now - result.captured_perf)
                self.recent.append(now)
                while self.recent[0] < now - RATE_WINDOW_S:
                    self.recent.popleft()
            elif result.status is Status.DROPPED:
                self.dropped += 1
            else:
                self.errors[error_kind(result)] += 1

    def close(self, completed: bool = True) -> SinkSummary:
        """Stop serving (engine.run closes this sink last, so the final counts are served while the others flush)."""
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()
        return SinkSummary()

    # the server side (its thread)
    def collect(self):
        """The metric families, made at each scrape from a copy of the counts."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )
        now = time.perf_counter()
        with self.lock:
            self.scrapes += 1
            counts = {"frames": self.frames, "scored": self.scored, "anomalies": self.anomalies,
                      "dropped": self.dropped}
            errors = dict(self.errors)
            latency, scores = self.latency.buckets(), self.scores.buckets()
            threshold, engine_id, last_time = self.threshold, self.engine_id, self.last_time
            while self.recent and self.recent[0] < now - RATE_WINDOW_S:
                self.recent.popleft()
            recent = len(self.recent)
        cam = [self.camera]
        docs = {"frames": "Frames that got a result (JSONL line): scored, dropped or errors",
                "scored": "Frames scored (a verdict)", "anomalies": "Scored frames above the threshold",
                "dropped": "Frames dropped unscored: by the drop-oldest policy (inference slower than the source), "
                "or lost by the source (a camera's skipped frame ids)"}
        for key, doc in docs.items():
            family = CounterMetricFamily(f"lineflow_{key}", doc, labels=["camera"])
            family.add_metric(cam, counts[key])
            yield family
        family = CounterMetricFamily("lineflow_errors", "Frames not scored, by kind (drops not included)",
                                     labels=["camera", "kind"])
        for kind, n in errors.items():
            family.add_metric([self.camera, kind], n)
        yield family
        family = HistogramMetricFamily("lineflow_latency_seconds", "Capture to result of scored frames, seconds",
                                       labels=["camera"])
        family.add_metric(cam, buckets=latency[0], sum_value=latency[1])
        yield family
        family = HistogramMetricFamily("lineflow_score", "Scores of scored frames; buckets around the threshold at "
                                       "the start of the run", labels=["camera"])
        family.add_metric(cam, buckets=scores[0], sum_value=scores[1])
        yield family
        family = GaugeMetricFamily("lineflow_threshold", "The threshold the newest result was judged against",
                                   labels=["camera"])
        family.add_metric(cam, threshold)
        yield family
        elapsed = min(RATE_WINDOW_S, now - self.started)  # a run younger than the window: over its age
        family = GaugeMetricFamily("lineflow_frames_per_second", f"Scored frames per second over the last "
                                   f"{RATE_WINDOW_S:g} s", labels=["camera"])
        family.add_metric(cam, recent / max(elapsed, 1e-3))
        yield family
        if last_time is not None:
            family = GaugeMetricFamily("lineflow_last_result_timestamp_seconds", "Unix time of the newest result",
                                       labels=["camera"])
            family.add_metric(cam, last_time)
            yield family
        family = InfoMetricFamily("lineflow_engine", "The engine scoring now (engine_id: the first 12 hex digits "
                                  "of the engine file's SHA-256)", labels=["camera"])
        family.add_metric(cam, {"engine_id": engine_id or "", "backend": str(self.engine.backend_name),
                                "precision": str(self.engine.precision)})
        yield family
        deliveries = [d for d in map(_delivery, self.sinks) if d is not None]
        if deliveries:
            waiting = GaugeMetricFamily("lineflow_sink_waiting", "Messages waiting for their receiver",
                                        labels=["camera", "sink"])
            delivered = CounterMetricFamily("lineflow_sink_delivered", "Messages the receiver took",
                                            labels=["camera", "sink"])
            lost = CounterMetricFamily("lineflow_sink_lost", "Messages that will never be delivered (queue full, "
                                       "refused, failed after retries, not sent at the end)", labels=["camera", "sink"])
            for d in deliveries:
                waiting.add_metric([self.camera, d.sink], d.waiting)
                delivered.add_metric([self.camera, d.sink], d.delivered)
                lost.add_metric([self.camera, d.sink], d.lost)
            yield from (waiting, delivered, lost)

    def _serve(self, host: str, port: int):
        """A threading WSGI server of prometheus_client's exposition on (host, port), bound now."""
        from wsgiref.simple_server import make_server

        from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app
        app = _guarded(make_wsgi_app(self.registry))
        if is_loopback(host):
            app = _loopback_only(app)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        except (socket.gaierror, UnicodeError) as e:
            raise UserError(f"--metrics {host}:{port}: cannot resolve host {host!r} "
                            f"({getattr(e, 'strerror', None) or e})") from None

        class Server(ThreadingWSGIServer):
            address_family = family
            allow_reuse_address = True

            def handle_error(self, request, client_address) -> None:
                """A client's broken request or connection is its own business: no traceback on the run's stderr."""

        try:
            return make_server(host, port, app, Server, handler_class=_SilentHandler)
        except OSError as e:
            why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise UserError(f"--metrics {host}:{port}: cannot listen there ({why})") from None


def _guarded(app):
    """`app` whose failure (a bug in a collector) is a 500 with one line, said once on stderr, never a traceback."""
    said = []

    def guarded(environ, start_response):
        try:
            return app(environ, start_response)
        except Exception as e:  # noqa: BLE001 - the run goes on; the scraper sees the failure
            if not said:
                said.append(e)
                warn_on_stderr(f"metrics: a scrape failed ({one_line(e)}); the run goes on")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [f"lineflow metrics failed: {one_line(e)}\n".encode()]
    return guarded


def _loopback_only(app):
    """`app` behind a Host check: a request whose Host does not name loopback gets 421 Misdirected Request."""
    def checked(environ, start_response):
        if not loopback_host_header(environ.get("HTTP_HOST")):
            start_response("421 Misdirected Request", [("Content-Type", "text/plain")])
            return [b"these metrics answer to localhost, 127.0.0.1 and [::1] only\n"]
        return app(environ, start_response)
    return checked
