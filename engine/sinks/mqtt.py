"""Verdicts to the machines that act on them over MQTT (paho-mqtt), never stalling the line.

`write(result)` returns at once: the message goes into paho's own outgoing store (QoS 1: kept until the
broker acknowledges it, resent after a reconnect; those written while no connection is up wait in the
sink, in order). Past the bound new messages are dropped and counted, never silently. A broker that is
absent or goes away is not an error of the run: it is a warning, the messages wait (bounded), and
`close()` says how many were delivered, waited, were dropped or never arrived. A message paho refuses
(its store full, or the message id still in flight) is dropped and counted too. `close()` takes at most its
flush_timeout plus CLOSE_SLACK_S, whatever paho's connection attempts are doing; every line the sink prints
names URLs with the password hidden (engine.common.redact).

MQTT topics, under the URL's prefix (a line) and a camera name:
    PREFIX/CAMERA/result      one JSON message per frame: the JSONL result's keys plus latency_ms (QoS 1)
    PREFIX/CAMERA/status      "online" (retained), "offline" on a clean close or as the broker's last will
    PREFIX/CAMERA/heartbeat   every few seconds: frames/s, frames, scored, dropped, errors, messages waiting
    PREFIX/CAMERA/drift       retained, at the start of a run (none in force: "state" "started") and at each
                              change of the drift kinds in force (engine.drift.DriftEvent.to_json:
                              the kinds, the change, the measured numbers, the frame index, the time) (QoS 1)
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from engine.common.errors import UserError, one_line
from engine.common.net import resolve, url_port
from engine.common.redact import redact
from engine.drift import DriftEvent
from engine.results import Result
from engine.sinks.base import FLUSH_TIMEOUT_S, SinkSummary, result_message, warn_on_stderr

__all__ = ["MqttSink", "MqttTarget", "parse_mqtt_url"]

MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MQTT_QUEUE_MAX = 65_535  # MQTT's message ids are 16 bits (paho numbers them 1..65535): more in flight would collide
CLOSE_SLACK_S = 0.3  # what close may take beyond flush_timeout: the offline status and paho's disconnect


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    prefix: str
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> MqttTarget:
    """mqtt://[USER[:PASSWORD]@]HOST[:PORT]/PREFIX (mqtts:// for TLS); UserError naming what is wrong."""
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme not in MQTT_PORTS:
        raise UserError(f"--mqtt {shown}: the URL must start with mqtt:// or mqtts://")
    port = url_port(parts, MQTT_PORTS[parts.scheme], f"--mqtt {shown}")
    if not parts.hostname:
        raise UserError(f"--mqtt {shown}: no broker host (mqtt://HOST:PORT/PREFIX)")
    prefix = parts.path.strip("/")
    if not prefix or "#" in url or "+" in prefix or "//" in prefix:  # '#' would start a URL fragment
        raise UserError(f"--mqtt {shown}: the path is the topic prefix (say /plant/line1), without # or + "
                        "and without empty levels")
    if parts.query:
        raise UserError(f"--mqtt {shown}: no query is understood")
    return MqttTarget(parts.hostname, port, prefix, parts.scheme == "mqtts",
                      unquote(parts.username) if parts.username else None,
                      unquote(parts.password) if parts.password else None)


class MqttSink:
    """One QoS-1 JSON message per frame to PREFIX/CAMERA/result; status and heartbeat topics (module docstring).

    `queue_limit` bounds the messages not yet acknowledged by the broker (waiting through an outage and in
    flight); past it new results are dropped and counted. Construction checks the URL and resolves the host
    (UserError: bad input); connecting happens in paho's thread, so an unreachable broker is a warning."""

    def __init__(self, url: str, camera: str = "camera", client_id: str | None = None, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, queue_limit: int = 10_000,
                 heartbeat_s: float = 5.0, stats=None, warn: Callable[[str], None] = warn_on_stderr,
                 flush_timeout: float = FLUSH_TIMEOUT_S):
        target = parse_mqtt_url(url)
        if ca_file is not None and not Path(ca_file).is_file():
            raise UserError(f"--mqtt-ca {ca_file}: no such file")
        if ca_file is not None and not target.tls:
            raise UserError("--mqtt-ca is for mqtts:// brokers (TLS)")
        if not 1 <= queue_limit <= MQTT_QUEUE_MAX:
            raise UserError(f"--mqtt-queue {queue_limit}: from 1 to {MQTT_QUEUE_MAX:,} (MQTT numbers the messages in "
                            "flight with 16-bit ids; more would reuse one still in flight)")
        resolve(target.host, target.port, "--mqtt")
        import paho.mqtt.client as mqtt
        self.target, self.warn_to, self.stats, self.queue_limit = target, warn, stats, queue_limit
        # what publish() may answer for a frame's message that paho keeps: sent, or (QoS 1) held until connected
        self.kept_codes, self.error_string = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN), mqtt.error_string
        self.refused = 0  # frames' messages paho refused (counted in dropped)
        self.flush_timeout = flush_timeout
        self.address = f"{target.host}:{target.port}"
        camera = re.sub(r"[^A-Za-z0-9_-]+", "_", camera) or "camera"
        base = f"{target.prefix}/{camera}"
        self.topic, self.status_topic, self.heartbeat_topic = f"{base}/result", f"{base}/status", f"{base}/heartbeat"
        self.drift_topic = f"{base}/drift"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"lineflow-{camera}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        user = username or target.username
        if user:
            self.client.username_pw_set(user, password or target.password)
        if target.tls:
            try:
                self.client.tls_set(ca_certs=ca_file)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: not a CA certificate
                raise UserError(f"--mqtt-ca {ca_file}: cannot use it as the broker's CA ({one_line(e)})") from None
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.lock = threading.Lock()
        self.published = self.acked = self.dropped = self.waited = 0
        # acknowledgements arrive on paho's thread, which holds paho's lock while it calls back: they are queued
        # there without taking ours (no lock-order deadlock with write) and matched to the frames' message ids here
        self.acks: deque = deque()
        self.unacked: set[int] = set()  # the frames' messages not yet acknowledged
        self.early: dict[int, float] = {}  # acks of ids not (yet) known: status messages, or a race with write
        self.connected, self.ever_connected, self.outage_reported, self.closed = False, False, False, False
        # results written while no connection is up wait here, in order (`holding`, from the start and from each
        # disconnect): paho sends what is published between CONNECT and CONNACK before what it queued earlier
        # (paho-mqtt issue 910), and after a reconnect it resends what it held only once on_connect has returned,
        # so what waited goes out once connected and every message handed to paho before is acknowledged, from
        # our threads, under publish_lock (never taken on paho's thread)
        self.backlog: deque = deque()
        self.holding, self.outages = True, 0
        self.publish_lock = threading.Lock()
        self.wake = threading.Event()  # a connection or an acknowledgement while holding: release the backlog
        self.client.on_connect, self.client.on_disconnect = self._on_connect, self._on_disconnect
        self.client.on_publish, self.client.on_connect_fail = self._on_publish, self._on_connect_fail
        self.client.connect_async(target.host, target.port, keepalive=10)
        self.client.loop_start()
        self.stop = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), name="lineflow-mqtt-heartbeat",
                                          daemon=True)
        self.heartbeat.start()

    # paho's callbacks (its network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._outage(f"the broker at {self.address} refused the connection ({reason_code})")
            return
        with self.lock:
            self.connected = True
            waiting = self._settle()
            again, self.ever_connected = self.ever_connected, True
        self.wake.set()
        client.publish(self.status_topic, "online", qos=1, retain=True)
        if again or self.outage_reported:
            self.warn(f"mqtt: connected to {self.address}; delivering {waiting} waiting messages")
        self.outage_reported = False

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        with self.lock:
            self.connected, self.holding = False, True
            self.outages += 1
        if not self.closed:
            self._outage(f"lost the broker at {self.address} ({reason_code})")

    def _on_connect_fail(self, client, userdata) -> None:
        self._outage(f"cannot reach the broker at {self.address}")

    def warn(self, text: str) -> None:
        """A warning with URLs redacted (a reason may quote paho's or the system's text); a stderr that is gone does
        not end paho's thread."""
        try:
            self.warn_to(redact(text))
        except (OSError, ValueError):
            pass

    def _outage(self, why: str) -> None:
        if not self.outage_reported and not self.closed:
            self.outage_reported = True
            self.warn(f"mqtt: {why}; messages wait (up to {self.queue_limit}) and are sent when it is back")

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        self.acks.append((mid, time.monotonic()))
        if self.holding:  # read without the lock (see self.acks): at worst one wake too many
            self.wake.set()

    def _settle(self) -> int:
        """Match the queued acknowledgements to the frames' messages (call under self.lock); the number waiting."""
        now = time.monotonic()
        while self.acks:
            mid, at = self.acks.popleft()
            self.early[mid] = at
        for mid in list(self.early):
            if mid in self.unacked:
                self.unacked.discard(mid)
                del self.early[mid]
                self.acked += 1
            elif now - self.early[mid] > 1.0:  # a status or heartbeat message's: not a frame's
                del self.early[mid]
        return len(self.unacked) + len(self.backlog)

    def _release_backlog(self) -> None:
        """Publish what waited, in order, and stop holding (call under publish_lock): only once connected and every
        message handed to paho earlier is acknowledged, which paho's own resend after a reconnect comes before."""
        with self.lock:
            self._settle()
            if not self.holding or not self.connected or self.unacked:
                return
            outages = self.outages
        while True:
            with self.lock:
                if self.outages != outages:  # lost again: paho holds what went out, the rest waits here
                    return
                if not self.backlog:
                    self.holding = False
                    return
                payload = self.backlog[0]
            self._hand(payload, from_backlog=True)

    def _hand(self, payload: str, from_backlog: bool = False) -> None:
        """Publish a frame's message (call under publish_lock); one paho refuses is dropped and counted, said once.
        From the backlog, it leaves the backlog in the same step as it is counted in flight (pending stays exact)."""
        try:
            info = self.client.publish(self.topic, payload, qos=1)
            code, mid = info.rc, info.mid
        except ValueError as e:  # paho's own checks (a payload over MQTT's 256 MB)
            code, mid = one_line(e), None
        with self.lock:
            if from_backlog:
                self.backlog.popleft()
            if code in self.kept_codes:
                self.unacked.add(mid)
                return
            self.published -= 1
            self.dropped += 1
            self.refused += 1
            first = self.refused == 1
        if first:
            why = code if isinstance(code, str) else self.error_string(code)
            self.warn(f"mqtt: paho refused a message ({why}); it is dropped and counted, and so is any later one")

    def _beat(self, period: float) -> None:
        next_beat = time.monotonic() + period
        while not self.stop.is_set():
            self.wake.wait(max(0.0, next_beat - time.monotonic()))
            if self.stop.is_set():
                return
            if self.wake.is_set():
                self.wake.clear()
                with self.publish_lock:
                    self._release_backlog()
            if time.monotonic() < next_beat:
                continue
            next_beat += period
            if self.connected and self.stats is not None:
                s = self.stats
                beat = {"time": time.time(), "frames_per_s": round(s.fps(), 2), "frames": s.frames,
                        "scored": s.scored, "dropped": s.dropped, "errors": s.errors,
                        "messages_waiting": self.pending, "messages_dropped": self.dropped}
                self.client.publish(self.heartbeat_topic, json.dumps(beat), qos=0)

    @property
    def pending(self) -> int:
        with self.lock:
            return self._settle()

    def write(self, result: Result) -> None:
        payload = json.dumps(result_message(result))
        with self.lock:
            if self._settle() >= self.queue_limit:
                self.dropped += 1
                return
            self.published += 1
            self.waited += not self.connected
            if self.holding:
                self.backlog.append(payload)
                return
        with self.publish_lock:
            with self.lock:
                if self.holding:  # a disconnect since: wait behind what paho holds
                    self.backlog.append(payload)
                    return
            self._hand(payload)  # kept by paho until PUBACK, resent after reconnects

    def drift_at_start(self, watching: tuple[str, ...], engine: str | None) -> None:
        """The state at the start of a run, retained: none in force (or null: nothing watched), so that the state a
        run before left (an alarm raised yesterday) does not outlive it."""
        state = {"drift": False if watching else None, "kind": None, "state": "started", "index": None,
                 "time": time.time(), "engine": engine, "numbers": {}, "watching": list(watching),
                 "text": f"run started, watching {' and '.join(watching)} drift" if watching else "drift not watched"}
        self.client.publish(self.drift_topic, json.dumps(state), qos=1, retain=True)

    def drift(self, event: DriftEvent) -> None:
        """A change of the drift kinds in force: retained, so that a controller connecting later reads the state; paho
        keeps it (QoS 1) through an outage. Not counted with the frames' messages."""
        self.client.publish(self.drift_topic, json.dumps(event.to_json()), qos=1, retain=True)

    @property
    def undelivered(self) -> int:
        """Messages that never reached the broker: dropped, or not acknowledged (so far; final after close)."""
        return self.pending + self.dropped

    def summary(self) -> str:
        pending = self.pending
        return (f"mqtt {self.address}/{self.topic}: {self.acked} of {self.published + self.dropped} messages "
                f"delivered, {self.waited} waited for the broker, {self.dropped} dropped (queue full"
                f"{', or refused by paho' if self.refused else ''}), "
                f"{pending + self.dropped} not delivered")

    def close(self, completed: bool = True) -> SinkSummary:
        """Wait up to `flush_timeout` s for unacknowledged messages (a broker away may come back), mark the camera
        offline (retained), disconnect: all within flush_timeout + CLOSE_SLACK_S, whatever paho is doing (its
        disconnect and loop_stop can wait on a connection attempt); thread-safe beside other sinks' closes."""
        if self.closed:
            return SinkSummary(self.summary(), self.undelivered)
        flush_end = time.monotonic() + self.flush_timeout
        self.stop.set()
        self.wake.set()
        self.heartbeat.join(max(0.0, flush_end - time.monotonic()))
        while self.pending and time.monotonic() < flush_end:  # a broker away may be back within the timeout
            if self.publish_lock.acquire(timeout=max(0.0, flush_end - time.monotonic())):
                try:
                    self._release_backlog()
                finally:
                    self.publish_lock.release()
            time.sleep(0.05)
        self.closed = True
        end = max(flush_end, time.monotonic()) + CLOSE_SLACK_S
        ender = threading.Thread(target=self._disconnect, args=(end,), name="lineflow-mqtt-close", daemon=True)
        ender.start()
        ender.join(max(0.0, end - time.monotonic()))  # past it paho's daemon thread is left to the process's end
        return SinkSummary(self.summary(), self.undelivered)

    def _disconnect(self, end: float) -> None:
        if self.connected:
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.05, end - time.monotonic() - 0.1))
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
