"""python -m engine.run model.engine --source SRC: score every frame of a camera, video, stream or image folder.

Prints a live status line (frames/s, latency p50/p99, drops) on stderr and one JSON line per frame to
--out (flushed as written). SRC: camera:N or /dev/videoN, rtsp:// or http:// stream, a video file, a
folder of images, or one image file. Verdicts also go to an MQTT broker (--mqtt) or a webhook
(--webhook), and the run can be watched in a browser (--view) and by Prometheus (--metrics).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
import time

from engine.common.cli import HelpFormatter
from engine.common.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    EXIT_SOURCE_FAILED,
    EXIT_TERMINATED,
    UserError,
    deferred_signals,
    run_cli,
)
from engine.common.files import check_output
from engine.common.redact import redacted_stderr, restore_stderr
from engine.drift import DriftEvent, DriftMonitor
from engine.reload import ReloadingEngine
from engine.results import ScoringEngine
from engine.runtime import Engine
from engine.sinks import (
    JsonlSink,
    LiveView,
    MapSink,
    MetricsSink,
    MqttSink,
    OpcUaSink,
    Sink,
    SinkSummary,
    VideoSink,
    WebhookSink,
    camera_name,
)
from engine.sinks.base import FLUSH_TIMEOUT_S, warn_on_stderr
from engine.sinks.review import DEFAULT_MAX_MB, DEFAULT_SAMPLE, ReviewSink
from engine.sources import SourceError, is_live
from engine.stream import POLICIES, StreamStats, run

__all__ = ["main", "EXIT_SOURCE_FAILED"]


def _event_line(text: str) -> None:
    """An event of the run (an engine swapped or refused) on stderr, on a line of its own."""
    print(f"\r{text}", file=sys.stderr, flush=True)


def _status(stats: StreamStats, stop: threading.Event, period: float = 0.5) -> None:
    while not stop.wait(period):
        print(f"\r{stats.line()}", end="", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.run", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog=f"exit status: 0 done; {EXIT_INTERNAL} the backend failed, or a bug; "
                                f"{EXIT_BAD_INPUT} bad engine, source or option (nothing written); "
                                f"{EXIT_SOURCE_FAILED} the source failed mid-run: a camera or stream lost after "
                                "reconnection attempts with backoff, hanging, or a video cut short; "
                                f"{EXIT_OUTPUT_FAILED} an output could not be written mid-run (disk full); "
                                f"{EXIT_INTERRUPTED} interrupted (Ctrl-C), {EXIT_TERMINATED} terminated (SIGTERM). "
                                "After 3, 4, 130 and 143 every result before the fault is written, in whole lines.")
    p.add_argument("engine", nargs="?", help="engine file written by python -m engine.build (or --server)")
    p.add_argument("--server", metavar="URL", help="score on a Triton server running python -m engine.serve instead "
                   "of a local engine: grpc://HOST:8001/MODEL or http://HOST:8000/MODEL (MODEL: the engine file's "
                   "stem); every sink, policy and statistic stays")
    p.add_argument("--server-send", choices=("full", "reduced"), default="full", help="full: every frame whole "
                   "(results equal a local engine's); reduced: frames larger than the engine's input resized to it "
                   "here with the engine's own resize, then rounded to uint8 (fewer bytes; scores move by that "
                   "rounding: docs/deploy.md); frames of tiling engines always travel whole")
    p.add_argument("--source", help="camera:N, /dev/videoN, gige://[CAMERA] (a GenICam camera), rtsp/http URL, video "
                   "file, image folder or image file")
    p.add_argument("--out", metavar="RESULTS.jsonl", help="one JSON line per frame: index, source, timestamp, "
                   "score and is_anomalous (or error)")
    p.add_argument("--save-maps", metavar="DIR", help="write a heat-map overlay PNG per frame into DIR")
    p.add_argument("--overlay-video", metavar="OUT.mp4", help="write an MP4 of heat-map overlays")
    p.add_argument("--max-fps", type=float, help="read the source no faster than this (frames/s)")
    p.add_argument("--batch", type=int, default=1, help="frames per inference call, at most (waiting frames "
                   "are batched; 1 = lowest latency)")
    p.add_argument("--policy", choices=POLICIES, help="when inference lags the source: drop the oldest waiting "
                   "frame (default for cameras/streams) or block the reader (default for files)")
    p.add_argument("--threads", type=int, help="backend threads (default: all cores this process may use)")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.add_argument("--reload", action="store_true", help="follow the engine file: a new file at the same path "
                   "(written beside it, then renamed over it) is loaded while the line runs and swapped in between "
                   "batches, no frame lost or scored twice; looked for twice a second, at once on SIGHUP; a file that "
                   "does not load or fit (input size, tiling) is refused in one line and the running engine stays")
    p.add_argument("--no-drift", action="store_true", help="do not watch for drift (default: the frames against "
                   "the engine's training frames, and the scores against its held-out good scores; each change one "
                   "line on stderr, the kinds in force on every JSONL line, MQTT PREFIX/CAMERA/drift; never a verdict "
                   "changed: docs/line-loop.md)")
    p.add_argument("--camera-name", help="the camera in MQTT topics and the view's title (default: from --source)")
    gige = p.add_argument_group("GenICam cameras (--source gige://[CAMERA]: GigE Vision, USB3 Vision, through Aravis; "
                                "pip install -e \".[genicam]\")")
    gige.add_argument("--list-cameras", action="store_true", help="list the cameras Aravis finds with the ids "
                      "gige://ID takes (a serial number, IP or MAC address opens one too), and exit; needs no engine")
    gige.add_argument("--camera-set", action="append", metavar="NAME=VALUE", help="set a GenICam feature "
                      "before acquiring, in order, e.g. --camera-set ExposureTime=5000 --camera-set Gain=2; a feature "
                      "the camera lacks or a value it rejects is refused in one line")
    gige.add_argument("--trigger", metavar="SOURCE", help="triggered acquisition, the policy then block: software "
                      "(lineflow triggers each frame when the line takes it, at --max-fps at most) or the camera's "
                      "trigger line (Line0, Line1, ...: waiting for the line's trigger is no hang); default: "
                      "free-running")
    line = p.add_argument_group("line integration (engine/sinks/): a slow or absent receiver never stalls the run")
    line.add_argument("--mqtt", metavar="URL", help="mqtt://HOST:PORT/PREFIX (mqtts:// for TLS): a QoS-1 JSON "
                      "message per frame on PREFIX/CAMERA/result, a retained PREFIX/CAMERA/status with a last will, "
                      "a heartbeat on PREFIX/CAMERA/heartbeat")
    line.add_argument("--mqtt-client-id", help="MQTT client id (default: lineflow-CAMERA)")
    line.add_argument("--mqtt-user", help="MQTT user name (or in the URL: mqtt://USER@HOST/...)")
    line.add_argument("--mqtt-password", help="MQTT password (better: the LINEFLOW_MQTT_PASSWORD environment "
                      "variable, which other users cannot read in the process list)")
    line.add_argument("--mqtt-ca", metavar="FILE", help="CA certificates for mqtts:// (default: the system's)")
    line.add_argument("--mqtt-queue", type=int, default=10_000, help="messages that may wait for the broker "
                      "(not yet acknowledged), 1 to 65,535 (MQTT's message ids); past it new ones are dropped and "
                      "counted")
    line.add_argument("--mqtt-heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    line.add_argument("--webhook", metavar="URL", help="HTTP POST of the frame's JSON for every anomalous frame")
    line.add_argument("--webhook-all", action="store_true", help="POST every frame, not only anomalous ones")
    line.add_argument("--webhook-timeout", type=float, default=2.0, help="seconds per POST")
    line.add_argument("--webhook-retries", type=int, default=3, help="retries of a failed POST, with backoff")
    line.add_argument("--webhook-queue", type=int, default=1000, help="POSTs that may wait; past it the oldest "
                      "waiting one is dropped and counted")
    opcua = p.add_argument_group("OPC UA for PLCs and SCADA (engine/sinks/opcua.py): the run never waits for a client")
    opcua.add_argument("--opcua", metavar="URL", help="opc.tcp://HOST:PORT (port 4840 if omitted): serve "
                       "Objects/lineflow/CAMERA in namespace urn:lineflow: LastVerdict (ok, anomalous, error, "
                       "dropped), LastScore, LastFrameTime, LastResult, Frames, Anomalies, Dropped, Errors, Status, "
                       "EngineId, Threshold, written every frame; on 127.0.0.1 (loopback) anonymous clients without "
                       "security, on any other address (0.0.0.0: all) only Basic256Sha256 SignAndEncrypt with "
                       "--opcua-user and its password")
    opcua.add_argument("--opcua-user", metavar="NAME", help="the user name clients must give (needed beyond "
                       "loopback; on loopback it turns security on too)")
    opcua.add_argument("--opcua-password", metavar="PASSWORD", help="its password (better: the "
                       "LINEFLOW_OPCUA_PASSWORD environment variable, which other users cannot read in the process "
                       "list)")
    opcua.add_argument("--opcua-cert", metavar="FILE", help="the server's certificate, DER or PEM, with "
                       "--opcua-key (default: a self-signed one made at the first secured run and kept in "
                       "$XDG_CONFIG_HOME/lineflow/opcua, ~/.config/lineflow/opcua; the start line shows its SHA-1 "
                       "thumbprint, which clients trust)")
    opcua.add_argument("--opcua-key", metavar="FILE", help="the private key of --opcua-cert: RSA, PEM or DER, "
                       "unencrypted")
    metrics = p.add_argument_group("Prometheus (engine/sinks/metrics.py): a scraper never holds back the run")
    metrics.add_argument("--metrics", metavar="[HOST:]PORT", help="serve Prometheus metrics of the run at "
                         "http://HOST:PORT/metrics (HOST 127.0.0.1 unless given; 0.0.0.0: all): lineflow_frames_total "
                         "(results, as JSONL lines), scored, anomalies, dropped, errors by kind, latency and score "
                         "histograms, frames/s, the engine's id, what the MQTT, webhook and OPC UA sinks have "
                         "waiting, delivered and lost; each labelled with the camera name (--camera-name)")
    view = p.add_argument_group("live view (engine/sinks/view.py)")
    view.add_argument("--view", metavar="[HOST:]PORT", help="serve a live page of the run at http://HOST:PORT/ "
                      "(HOST 127.0.0.1 unless given; any other address requires a token)")
    view.add_argument("--view-token", help="the token the page asks for (default: none on 127.0.0.1, a random one "
                      "printed with the URL elsewhere; or the LINEFLOW_VIEW_TOKEN environment variable)")
    view.add_argument("--view-hold", type=float, metavar="SECONDS", help="keep serving after the source ends "
                      "(default: until Ctrl-C for folders, files and videos, so a batch can be reviewed; 0 for "
                      "cameras and streams)")
    review = p.add_argument_group("review (engine/sinks/review.py)")
    review.add_argument("--review", metavar="DIR", help="keep every flagged frame and a sample of passed ones in DIR "
                        "(lossless PNG, overlay PNG, a line of DIR/queue.jsonl) for labelling: python -m "
                        "engine.review DIR, or the view's review page; a folder with a queue is continued")
    review.add_argument("--review-sample", type=float, default=DEFAULT_SAMPLE, metavar="F", help="share of passed "
                        "frames kept (the same frames on every run: a hash of the frame's index)")
    review.add_argument("--review-max-mb", type=float, default=DEFAULT_MAX_MB, metavar="N", help="disk use of DIR "
                        "at most; past it the oldest unlabelled frames are deleted first, and counted")
    return p


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path checked before anything runs: a bad one fails in one line, with nothing written."""
    for opt, path, folder in (("--out", args.out, False), ("--save-maps", args.save_maps, True),
                              ("--overlay-video", args.overlay_video, False), ("--review", args.review, True)):
        if path:
            check_output(opt, path, folder)


def _line_sinks(args: argparse.Namespace, engine: ScoringEngine, stats: StreamStats) -> list[Sink]:
    """The MQTT, webhook, OPC UA and view sinks: URLs checked, hosts resolved, the view's and the OPC UA server's ports
    bound (bad input fails here, before any frame is read)."""
    if not (args.mqtt or args.webhook or args.view or args.opcua or args.metrics):
        return []
    camera = args.camera_name or camera_name(args.source)
    hold = args.view_hold if args.view_hold is not None else (0.0 if is_live(args.source) else None)
    sinks: list[Sink] = []
    try:
        if args.view:
            token = args.view_token or os.environ.get("LINEFLOW_VIEW_TOKEN") or None
            view = LiveView(args.view, engine.threshold, token, stats, title=camera, hold=hold,
                            review_dir=args.review)
            print(f"view: {view.url}", file=sys.stderr, flush=True)
            sinks.append(view)
        if args.mqtt:
            sinks.append(MqttSink(args.mqtt, camera, args.mqtt_client_id, args.mqtt_user,
                                  args.mqtt_password or os.environ.get("LINEFLOW_MQTT_PASSWORD"), args.mqtt_ca,
                                  args.mqtt_queue, args.mqtt_heartbeat, stats))
        if args.webhook:
            sinks.append(WebhookSink(args.webhook, args.webhook_all, args.webhook_timeout, args.webhook_retries,
                                     args.webhook_queue))
        if args.opcua:  # the environment's password only with a user: a variable left set does not refuse loopback
            password = args.opcua_password or (os.environ.get("LINEFLOW_OPCUA_PASSWORD") if args.opcua_user else None)
            opcua = OpcUaSink(args.opcua, camera, args.opcua_user, password, args.opcua_cert, args.opcua_key,
                              threshold=engine.threshold, engine_id=engine.engine_id)
            print(opcua.description(), file=sys.stderr, flush=True)
            sinks.append(opcua)
        if args.metrics:  # last: it reads the message sinks made above
            metrics = MetricsSink(args.metrics, camera, engine, sinks)
            print(f"metrics: {metrics.url}", file=sys.stderr, flush=True)
            sinks.append(metrics)
    except BaseException:
        _close_all(sinks, completed=False)
        raise
    return sinks


def _camera(args: argparse.Namespace) -> tuple[object | None, dict]:
    """A gige:// source's settings and the stream options they imply (engine/genicam.py, imported only for one)."""
    if not args.source.startswith("gige://"):
        if args.camera_set or args.trigger:
            raise UserError("--camera-set and --trigger are for GenICam cameras (--source gige://[CAMERA])")
        return None, {}
    from engine.genicam import CameraSettings, parse_feature, stream_options
    settings = CameraSettings(tuple(parse_feature(text) for text in args.camera_set or ()), args.trigger)
    return settings, stream_options(settings)


def _list_cameras() -> int:
    from engine.genicam import list_cameras
    cameras = list_cameras()
    for c in cameras:
        print(f"gige://{c['id']}\t{c['vendor']} {c['model']}\tserial {c['serial']}\t{c['address']}\t{c['protocol']}")
    if not cameras:
        print("no GenICam camera found (GigE Vision: on a subnet of this host's interfaces; USB3 Vision: plugged "
              "in, with access to the device)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    with redacted_stderr():  # a password in a URL never shows, in our lines or in OpenCV's, FFmpeg's and paho's
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.list_cameras:
        return _list_cameras()
    if args.source is None:
        raise UserError("--source is required (or --list-cameras)")
    args.camera, args.camera_stream = _camera(args)
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    if args.max_fps is not None and args.max_fps <= 0:
        raise UserError("--max-fps must be positive")
    _check_outputs(args)
    if not 0 <= args.review_sample <= 1:
        raise UserError(f"--review-sample {args.review_sample:g}: a share from 0 to 1")
    if not args.review_max_mb > 0:
        raise UserError(f"--review-max-mb {args.review_max_mb:g}: must be positive")
    if args.mqtt_heartbeat <= 0:
        raise UserError("--mqtt-heartbeat must be positive")
    if (args.engine is None) == (args.server is None):
        raise UserError("give an engine file or --server URL (one of the two)")
    if args.reload and args.server:
        raise UserError("--reload follows a local engine file; a server reloads its own (engine.serve --reload)")
    if args.server:
        from engine.remote import RemoteEngine
        engine = RemoteEngine(args.server, reduce=args.server_send == "reduced")  # unreachable: fails here
    elif args.reload:
        engine = ReloadingEngine(args.engine, args.threads, on_event=_event_line)  # a bad first file fails here
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda signum, frame: engine.reload_now())
    else:
        engine = Engine(args.engine, args.threads)  # a bad engine fails here, before any output exists
    stats = StreamStats()
    with engine:  # the stream's threads are joined, then the backend's stopped, before the process exits
        line_sinks = _line_sinks(args, engine, stats)
        code = _stream(args, engine, stats, line_sinks)
    if stats.capture_stuck:  # a source hanging inside read() cannot be joined: leave without tearing it down
        print("note: the source's reader hung and was abandoned", file=sys.stderr)
        sys.stdout.flush()
        restore_stderr()  # os._exit skips the redirection's own end
        os._exit(code)
    return code


FILE_SINKS = (JsonlSink, MapSink, VideoSink, ReviewSink)


def _close_all(sinks: list[Sink], completed: bool) -> list[SinkSummary]:
    """Close every sink: the files first, one after another; then the message sinks (MQTT, webhook) together, each
    flushing for at most FLUSH_TIMEOUT_S, so all are done within it; the live view last (after a completed run it may
    serve on for review until Ctrl-C), then the metrics (served until then, final counts included). Signals wait until
    the files and messages are done (engine.common.errors: deferred_signals), and a failure in one close skips none of
    the others. Prints the summaries; raises the first
    failure, or the signal, after all are closed."""
    files = [s for s in sinks if isinstance(s, FILE_SINKS)]
    views = [s for s in sinks if isinstance(s, (LiveView, MetricsSink))]  # the metrics serve the others' final counts
    messages = [s for s in sinks if s not in files and s not in views]
    closed: dict[int, SinkSummary] = {}
    failures: list[BaseException] = []

    def close(sink: Sink, done: bool) -> None:
        try:
            closed[id(sink)] = sink.close(done)
        except BaseException as e:  # noqa: BLE001 - the others still close; the first failure is reported
            failures.append(e)

    with deferred_signals() as signals:
        for s in files:
            close(s, completed)
        threads = [threading.Thread(target=close, args=(s, completed), name="lineflow-close", daemon=True)
                   for s in messages]
        for t in threads:
            t.start()
        deadline = time.monotonic() + FLUSH_TIMEOUT_S + 1.0  # each flush is bounded; this bounds a broken one
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        late = [s for s, t in zip(messages, threads) if t.is_alive()]
    for s in views:  # outside the deferral: Ctrl-C ends a review hold
        close(s, completed and not signals.signalled)
    summaries = [closed[id(s)] for s in sinks if id(s) in closed]
    for summary in summaries:
        if summary.line is not None and summary.undelivered:
            warn_on_stderr(summary.line)
        elif summary.line is not None:
            print(summary.line, file=sys.stderr)
    for s in late:
        warn_on_stderr(f"{type(s).__name__} did not close within {FLUSH_TIMEOUT_S + 1:g} s; its messages in flight "
                       "are lost")
    signals.raise_pending()
    interrupts = [e for e in failures if isinstance(e, KeyboardInterrupt)]
    if interrupts or failures:
        raise (interrupts or failures)[0]
    return summaries


def _drift_monitor(args: argparse.Namespace, engine: ScoringEngine) -> DriftMonitor | None:
    """The run's drift monitor, following the engine across swaps (None: --no-drift, or a server's engine, whose
    header is on the server)."""
    if args.no_drift or not isinstance(engine, (Engine, ReloadingEngine)):
        return None
    return DriftMonitor.for_engine(engine)


def _drift_events(drift: DriftMonitor, index: int | None, sinks: list[Sink]) -> None:
    """The drift changes up to frame `index`: a line each on stderr, and to the MQTT sinks."""
    events: list[DriftEvent] = drift.events_until(index)
    for event in events:
        _event_line(event.line())
        for s in sinks:
            if isinstance(s, MqttSink):
                s.drift(event)


def _stream(args: argparse.Namespace, engine: ScoringEngine, stats: StreamStats, line_sinks: list[Sink]) -> int:
    with_maps = bool(args.save_maps or args.overlay_video or args.view or args.review)
    drift = _drift_monitor(args, engine)
    results = run(engine, args.source, batch_size=args.batch, policy=args.policy or args.camera_stream.get("policy"),
                  max_fps=args.max_fps, with_maps=with_maps, stats=stats, drift=drift, on_event=_event_line,
                  frame_timeout=args.camera_stream.get("frame_timeout", -1.0), camera=args.camera)
    sinks: list[Sink] = list(line_sinks)
    try:
        first = next(results, None)  # opens the source: a bad source fails here, before any output exists
        if args.review:  # first: a folder another run is writing is refused before any output is touched
            sinks.append(ReviewSink(args.review, args.review_sample, args.review_max_mb))
        if args.out:
            sinks.append(JsonlSink(args.out))
        if args.save_maps:
            sinks.append(MapSink(args.save_maps, engine.threshold))
        if args.overlay_video:  # at the source's own rate where it states one (video, camera)
            sinks.append(VideoSink(args.overlay_video, engine.threshold, fps=stats.source_fps or args.max_fps or 10.0))
    except BaseException:
        results.close()  # joins the stream's threads
        _close_all(sinks, completed=False)
        raise
    if drift is None and not args.no_drift:
        print("drift: off (the engine's training statistics and held-out scores stay on the server)", file=sys.stderr)
    for note in drift.notes if drift is not None else ():  # said once, after the source opened
        print(f"drift: {note}", file=sys.stderr)
    for s in sinks:
        if isinstance(s, MqttSink):  # a state an earlier run left retained does not outlive it
            s.drift_at_start(drift.watching if drift is not None else (), engine.engine_id)
    stop = threading.Event()
    status = threading.Thread(target=_status, args=(stats, stop), daemon=True)
    if not args.quiet:
        status.start()
    t0 = time.perf_counter()
    anomalous = 0
    failure: SourceError | None = None
    summaries: list[SinkSummary] = []
    try:
        for r in itertools.chain([first] if first is not None else [], results):
            anomalous += bool(r.is_anomalous)
            if drift is not None:
                _drift_events(drift, r.index, sinks)
            for s in sinks:
                s.write(r)
            if args.out is None and r.error is None:
                print(f"{r.index}\t{r.source}\t{r.score:.4f}\t{'ANOMALOUS' if r.is_anomalous else 'ok'}")
            elif args.out is None:
                print(f"{r.index}\t{r.source}\terror: {r.error}")
    except SourceError as e:  # every result before the fault has been written; the sinks close below
        failure = e
    finally:  # also on Ctrl-C, SIGTERM and a sink's failure: the threads joined, every sink closed
        elapsed = time.perf_counter() - t0
        in_flight = sys.exc_info()[0] is not None  # Ctrl-C, SIGTERM or a sink's failure: that is what is reported
        with deferred_signals():  # a second signal waits: the stream's threads are joined before the sinks close
            stop.set()
            results.close()
            if not args.quiet:
                print(f"\r{stats.line()}", file=sys.stderr)
        try:
            summaries = _close_all(sinks, completed=failure is None and not in_flight)
        except (Exception, KeyboardInterrupt):  # a failure or signal in the cleanup: reported, unless one already is
            if not in_flight:
                raise
    undelivered = sum(s.undelivered for s in summaries)
    print(f"{stats.frames} frames in {elapsed:.1f} s: {stats.scored} scored, {anomalous} anomalous "
          f"(threshold {engine.threshold:.4f}), {stats.dropped} dropped, {stats.errors} errors; "
          f"{engine.backend_name} {engine.precision}"
          + (f"; {undelivered} messages not delivered" if undelivered else ""), file=sys.stderr)
    if stats.outage_line():  # a live source's gaps: how long, how many reconnection attempts, frames not read
        print(stats.outage_line(), file=sys.stderr)
    if engine.run_summary():  # a thin camera host: what travelled
        print(engine.run_summary(), file=sys.stderr)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_SOURCE_FAILED
    return 0


if __name__ == "__main__":
    run_cli(main)
