"""Network streams that stall and come back: OpenCV's timeouts apply, the run reconnects and reports the outage
(its duration, the reconnection attempts, the frames not read), and no password reaches a label or message.

The stream is a local MJPEG camera (HTTP multipart/x-mixed-replace on loopback, a free port) that can stop
answering for a while: open connections stall, new ones wait, as a camera behind a dropped link does."""

import http.server
import threading
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="network streams go through OpenCV")

PASSWORD = "s3cr3tPW"
FPS = 25  # what FFmpeg states for an MJPEG stream over HTTP (it carries no rate)


class MjpegCamera:
    """An MJPEG camera on 127.0.0.1 at FPS; outage(seconds): it stops answering, then serves new connections again.
    A connection from before the outage stays open and silent (half-open: the camera restarted and forgot it, and
    no reset reached the reader), so only a read timeout ends it."""

    def __init__(self):
        self.up, self.closed, self.generation = threading.Event(), threading.Event(), 0
        self.up.set()
        rng = np.random.default_rng(0)
        self.jpeg = cv2.imencode(".jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))[1].tobytes()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                camera.up.wait()
                if camera.closed.is_set():
                    return
                generation = camera.generation
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (
                    len(camera.jpeg), camera.jpeg)
                try:
                    while True:
                        camera.up.wait()  # an outage: this connection stalls
                        if camera.generation != generation:
                            camera.closed.wait()
                        if camera.closed.is_set():
                            return
                        self.wfile.write(part)
                        self.wfile.flush()
                        time.sleep(1 / FPS)
                except OSError:
                    return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://viewer:{PASSWORD}@127.0.0.1:{self.server.server_port}/stream.mjpg"

    def outage(self, seconds: float) -> None:
        self.generation += 1
        self.up.clear()
        threading.Timer(seconds, self.up.set).start()

    def close(self) -> None:
        self.closed.set()
        self.up.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def camera():
    c = MjpegCamera()
    yield c
    c.close()


@pytest.fixture
def short_timeouts(monkeypatch):
    """A stream timeout of 1 s and short backoffs (0.2 s doubling, at most 1 s): an outage in seconds."""
    from engine import sources
    monkeypatch.setattr(sources, "STREAM_TIMEOUT_MS", 1000)
    monkeypatch.setattr(sources, "RECONNECT_BACKOFF_S", 0.2)
    monkeypatch.setattr(sources, "RECONNECT_MAX_WAIT_S", 1.0)


def test_the_frame_timeout_outlasts_a_reconnection_attempt():
    """Each attempt yields its notice, then waits, reopens and reads: the run's frame timeout ("the source hangs")
    must outlast the longest such silence, or it would end the run before the attempts are made."""
    from engine import sources, stream
    silence = sources.RECONNECT_MAX_WAIT_S + 2 * sources.STREAM_TIMEOUT_MS / 1000
    assert sources.LONGEST_SILENCE_S == silence and stream.LIVE_FRAME_TIMEOUT_S > silence


def test_a_stalled_stream_times_out_at_the_stream_timeout(camera, short_timeouts):
    """OpenCV's FFmpeg backend takes its timeouts from the constructor only: set afterwards they never applied
    and a stalled stream blocked read() for FFmpeg's 30 s, as long as the run's frame timeout."""
    from engine.sources import open_source
    frames = open_source(camera.url)
    got: list = []

    def read():
        for f in frames:
            got.append((time.perf_counter(), f))
            if f.error is not None:
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while len(got) < 5:
        time.sleep(0.01)
    camera.outage(20)
    stalled = time.perf_counter()
    reader.join(5)
    if not reader.is_alive():
        frames.close()
    assert got[-1][1].error is not None, "no reconnection notice 5 s into a stall (the 1 s read timeout never fired)"
    assert got[-1][0] - stalled < 2.5
    assert "reconnecting" in got[-1][1].error


def test_a_stream_that_never_answers_fails_to_open_at_the_stream_timeout(short_timeouts):
    import socket

    from engine.common.errors import UserError
    from engine.sources import open_source
    with socket.socket() as mute:  # accepts connections (the backlog), never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        t0 = time.perf_counter()
        with pytest.raises(UserError, match="cannot open") as e:
            open_source(f"rtsp://viewer:{PASSWORD}@127.0.0.1:{mute.getsockname()[1]}/live")
        assert time.perf_counter() - t0 < 5  # FFmpeg's own 30 s before the fix
    assert PASSWORD not in str(e.value) and "viewer:***@" in str(e.value)


def test_an_outage_is_survived_and_reported(camera, short_timeouts, tiny, capfd):
    """The camera stops answering for 3 s mid-run: the run reconnects, goes on, and reports the outage once it is
    over (a line when it began and one when it ended; a record on StreamStats), without the password."""
    import engine
    from engine.results import Status
    from engine.stream import StreamStats, run
    events: list[str] = []
    stats = StreamStats()
    results, after = [], 0
    with engine.load(tiny["engine"]) as eng:
        # frame_timeout above the longest silence of the patched constants (1 s backoff + 1 s open + 1 s read)
        stream = run(eng, camera.url, with_maps=False, stats=stats, frame_timeout=6.0, on_event=events.append)
        t_end = time.monotonic() + 30
        for r in stream:
            results.append(r)
            if len(results) == 10:
                camera.outage(3.0)
            after += bool(stats.outages and stats.outages[0].ended is not None and r.status is Status.OK)
            if after >= 10 or time.monotonic() > t_end:
                break
        stream.close()
    assert after >= 10, [r.error for r in results if r.error]
    assert [r.index for r in results] == list(range(len(results)))  # nothing lost, in order
    assert len(stats.outages) == 1
    outage = stats.outages[0]
    assert 2.5 < outage.duration_s() < 6.0, outage
    assert 1 <= outage.attempts <= 4, outage
    notices = [r for r in results if r.status is Status.ERROR]
    assert len(notices) == outage.attempts and all("reconnecting" in r.error for r in notices)
    assert outage.fps == FPS and abs(outage.frames_not_read() - outage.duration_s() * FPS) < 2  # the gap, less one
    assert len(events) == 2, events
    assert "lost" in events[0] and "reconnecting" in events[0]
    assert f"back after {outage.duration_s():.1f} s: {outage.attempts} reconnection attempt" in events[1]
    assert f"~{outage.frames_not_read()} frames not read" in events[1]
    assert stats.outage_line().startswith(f"1 stream outage, {outage.duration_s():.1f} s in all: {outage.attempts} ")
    labels = {r.source for r in results} | {r.error for r in notices} | set(events)
    assert all(PASSWORD not in text and "viewer:***@" in text for text in labels), labels
    assert PASSWORD not in capfd.readouterr().err  # what FFmpeg and OpenCV print
