"""A thin camera host: the Engine interface over a Triton server running `python -m engine.serve`.

`RemoteEngine("grpc://HOST:8001/MODEL")` (or `http://HOST:8000/MODEL`) scores frames on the server with
`tritonclient`, so `engine.run --server URL` keeps every source, sink, policy and statistic of a local
engine. At connection it asks the model for its engine's facts (threshold, input size, tiling,
backend) with one blank frame.

What travels: uint8 RGB frames, whole by default (results equal a local engine's). With `reduce=True`
(`--server-send reduced`) a frame larger than the engine's input on both sides (the engine not tiling)
is resized to the input size here with the engine's own resize (engine.native): the server's resize is
then the identity, so what differs from sending the whole frame is the rounding of the resized frame
to uint8 (measured in docs/deploy.md); the maps come back at the input size and are resized to the
frame here, as the engine does.

A frame the server could not score (a non-finite score: engine_info's "error" says so) is an error result
naming the server's reason, never a verdict: every score becomes a Result through engine.results.verdict,
here as in the local engine, so a NaN from any server is an error result too.

A server that fails or goes away never ends the run: the frames of a failed call get error results,
in order, and the server is tried again after a backoff (0.5 s doubling to 5 s); meanwhile frames get
error results at once. A frame the server refuses is an error result for that frame's request only.
"""

from __future__ import annotations

import json
import math
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from engine import native
from engine.common.errors import UserError, one_line
from engine.common.net import resolve, url_port
from engine.common.redact import redact
from engine.preprocess import to_rgb_float
from engine.results import Result, verdict

__all__ = ["RemoteEngine", "parse_server_url", "ENGINE_INFO"]

ENGINE_INFO = "engine_info"  # engine.serve's output: the engine's facts as JSON (what a client needs to know)
PORTS = {"grpc": 8001, "http": 8000}
BACKOFF_S = (0.5, 5.0)
# tritonclient's status of a server that answered: it refused the request (Triton's own input checks: HTTP 400,
# gRPC INVALID_ARGUMENT), or failed on it (the model's Python side raised: 500, INTERNAL). Either way that request
# fails alone; any other status, or none (a socket error or timeout; 502-504, UNAVAILABLE, a deadline), is
# "away": an outage, backed off.
ANSWERED_STATUSES = {"400": "refused", "StatusCode.INVALID_ARGUMENT": "refused",
                     "500": "failed", "StatusCode.INTERNAL": "failed"}
FAILURE_WORDS = {"refused": "refused the frame", "failed": "failed on the frame", "away": "error"}


def parse_server_url(url: str) -> tuple[str, str, int, str]:
    """grpc://HOST[:PORT]/MODEL or http://HOST[:PORT]/MODEL -> (protocol, host, port, model)."""
    parts = urlsplit(url)
    if parts.scheme not in PORTS:
        raise UserError(f"--server {url}: the URL must be grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL")
    port = url_port(parts, PORTS[parts.scheme], f"--server {url}")
    model = parts.path.strip("/")
    if not parts.hostname or not model or "/" in model:
        raise UserError(f"--server {url}: expected {parts.scheme}://HOST:PORT/MODEL (the model is the engine "
                        "file's stem)")
    resolve(parts.hostname, port, f"--server {url}")
    return parts.scheme, parts.hostname, port, model


def _rgb_uint8(frame: np.ndarray, bgr: bool) -> np.ndarray:
    a = np.asarray(frame)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and 0 not in a.shape:
        return np.ascontiguousarray(a[:, :, ::-1] if bgr else a)
    return np.ascontiguousarray((to_rgb_float(a, bgr) * 255).round().astype(np.uint8))


def server_failure(e: BaseException) -> str:
    """What a tritonclient error says: "refused" (the request), "failed" (the server, on this request) or "away"."""
    status = getattr(e, "status", None)
    return ANSWERED_STATUSES.get(str(status()) if callable(status) else "", "away")


class RemoteEngine:
    """engine.Engine's interface (score, infer, threshold, close) for frames scored by a Triton server."""

    def __init__(self, url: str, reduce: bool = False, timeout: float = 10.0):
        self.protocol, self.host, self.port, self.model = parse_server_url(url)
        self.url, self.reduce, self.timeout = url, reduce, timeout
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as client
            else:
                import tritonclient.http as client
        except ImportError as e:
            raise UserError(f"--server needs tritonclient ({e}): pip install 'tritonclient[http,grpc]'") from None
        self.client_module = client
        self.local = threading.local()  # one client per thread: tritonclient.http's (gevent) is bound to its thread
        self.clients: list = []
        self.lock = threading.Lock()
        self.down_until, self.backoff, self.failures = 0.0, BACKOFF_S[0], 0
        try:
            info = self._call(np.zeros((1, 8, 8, 3), np.uint8), [ENGINE_INFO])[ENGINE_INFO]
            self.info = json.loads(bytes(info.reshape(-1)[0]))
        except Exception as e:  # noqa: BLE001 - tritonclient's exceptions: a server that is not there
            raise UserError(f"--server {url}: the model does not answer ({one_line(e, 200)}); is python -m "
                            f"engine.serve running there with the engine {self.model}.engine?") from None
        self.threshold = float(self.info["threshold"])  # the latest seen: a server with --reload may swap engines
        if not math.isfinite(self.threshold):
            raise UserError(f"--server {url}: the server's engine has a non-finite threshold ({self.threshold})")
        self.engine_id: str | None = self.info.get("engine_id")
        self.input_size = tuple(self.info["input_size"])  # (H, W)
        self.tiling = self.info.get("tiling")
        self.backend_name = f"{self.protocol}://{self.host}:{self.port}/{self.model}"
        self.precision = f"{self.info.get('backend', '?')} {self.info.get('precision', '?')} on the server"
        self.sent_bytes = self.sent_frames = 0

    def _client(self):
        c = getattr(self.local, "client", None)
        if c is None:
            address = f"{self.host}:{self.port}"
            c = self.client_module.InferenceServerClient(address, network_timeout=self.timeout) \
                if self.protocol == "http" else self.client_module.InferenceServerClient(address)
            self.local.client = c
            with self.lock:
                self.clients.append(c)
        return c

    def _call(self, batch: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        client = self.client_module
        inp = client.InferInput("frames", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._client().infer(self.model, [inp], outputs=[client.InferRequestedOutput(o) for o in outputs],
                                   **kwargs)
        return {o: result.as_numpy(o) for o in outputs}

    def _edge(self, frame: np.ndarray) -> np.ndarray:
        """The frame as it travels: reduced to the input size where that keeps the engine's geometry."""
        h, w = frame.shape[:2]
        in_h, in_w = self.input_size
        if not self.reduce or self.tiling or h <= in_h or w <= in_w:
            return frame
        x = native.preprocess([frame], (in_h, in_w))[0]  # the engine's own resize, float in [0, 1]
        return np.ascontiguousarray((x.transpose(1, 2, 0) * 255).round().astype(np.uint8))

    def score(self, frames: list[np.ndarray], bgr: bool = False, with_maps: bool = True) -> list[Result]:
        """One Result per frame, in order; error results (never an exception) where the server failed."""
        results: list[Result | None] = [None] * len(frames)
        groups: dict[tuple, list[int]] = {}
        sent = []
        for i, f in enumerate(frames):
            try:
                rgb = _rgb_uint8(f, bgr)
            except ValueError as e:
                results[i] = Result(None, None, error=f"bad frame: {e}")
                sent.append(None)
                continue
            sent.append(self._edge(rgb))
            groups.setdefault(sent[i].shape, []).append(i)
        outputs = ["score", "is_anomalous", ENGINE_INFO] + (["anomaly_map"] if with_maps else [])
        for idx in groups.values():
            with self.lock:
                wait = self.down_until - time.monotonic()
            if wait > 0:
                unavailable = redact(f"server unavailable: {self.url} (next try in {wait:.1f} s)")
                for i in idx:
                    results[i] = Result(None, None, error=unavailable)
                continue
            batch = np.stack([sent[i] for i in idx])
            try:
                out = self._call(batch, outputs)
            except Exception as e:  # noqa: BLE001 - tritonclient raises its own and socket errors alike
                reason = one_line(e, 200)
                failure = server_failure(e)
                if failure == "away":
                    with self.lock:  # the server is away: back off before trying again
                        self.failures += 1
                        self.down_until = time.monotonic() + self.backoff
                        self.backoff = min(self.backoff * 2, BACKOFF_S[1])
                for i in idx:
                    results[i] = Result(None, None, error=redact(f"server {FAILURE_WORDS[failure]}: {reason}"))
                continue
            with self.lock:
                self.backoff, self.down_until = BACKOFF_S[0], 0.0
                self.sent_frames += len(idx)
                self.sent_bytes += batch.nbytes
            for j, i in enumerate(idx):
                amap = None
                if with_maps:
                    amap = out["anomaly_map"][j]
                    h, w = np.asarray(frames[i]).shape[:2]
                    if amap.shape != (h, w):
                        amap = native.resize_maps(amap[None], (h, w))[0]
                info = out.get(ENGINE_INFO)  # a server that sends none: the facts it gave at connection
                engine_id, threshold, error = (self.engine_id, self.threshold, None) if info is None else \
                    self._scored_by(info.reshape(-1)[j])
                # the server's is_anomalous is not read: the score (float32, as the engine computes it) is judged
                # against the threshold here, by the rule every engine uses
                results[i] = verdict(float(out["score"].reshape(-1)[j]), threshold, amap, engine_id,
                                     error=None if error is None else f"server: {error}")
        return results  # type: ignore[return-value]

    def _scored_by(self, info: bytes) -> tuple[str | None, float, str | None]:
        """The id and threshold of the server's engine that scored a frame (they change when the server swaps its
        engine file: engine.serve --reload), and the server's error for the frame (None: scored)."""
        try:
            facts = json.loads(bytes(info))
            engine_id, threshold = facts.get("engine_id"), float(facts["threshold"])
            error = facts.get("error")
        except (ValueError, KeyError, TypeError, AttributeError):
            return self.engine_id, self.threshold, None
        if error is not None:  # the server's text, as one line a sink can carry
            error = redact((str(error).strip().splitlines() or ["no reason given"])[0][:300])
        if not math.isfinite(threshold):  # not adopted: the frame's verdict says so, the next frames keep the last
            return engine_id, threshold, error
        self.engine_id, self.threshold = engine_id, threshold
        return engine_id, threshold, error

    def infer(self, frames, bgr: bool = False):
        """A frame -> Result; a list of frames -> list of Results (as Engine.infer)."""
        single = isinstance(frames, np.ndarray) and frames.ndim in (2, 3) and frames.dtype != object
        results = self.score([frames] if single else list(frames), bgr)
        return results[0] if single else results

    def run_summary(self) -> str | None:
        """What travelled to the server (engine.results.ScoringEngine), once a frame has."""
        if not self.sent_frames:
            return None
        return (f"server {self.url}: {self.sent_frames} frames sent, {self.sent_bytes / 1e6:.1f} MB of uint8 RGB "
                f"({'reduced to the engine input where larger' if self.reduce else 'whole'})")

    def close(self) -> None:
        for c in self.clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001, S110 - closing a client of a server that is gone, or another thread's
                pass

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
