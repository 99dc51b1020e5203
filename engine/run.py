"""python -m engine.run model.engine --source SRC: score every frame of a camera, video, stream or image folder.

Prints a live status line (frames/s, latency p50/p99, drops) on stderr and one JSON line per frame to
--out (flushed as written). SRC: camera:N or /dev/videoN, rtsp:// or http:// stream, a video file, a
folder of images, or one image file.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time

from engine.common.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    EXIT_SOURCE_FAILED,
    EXIT_TERMINATED,
    UserError,
    run_cli,
)
from engine.common.files import check_output
from engine.runtime import Engine
from engine.sinks import JsonlSink, MapSink, VideoSink
from engine.sources import SourceError
from engine.stream import POLICIES, StreamStats, run

__all__ = ["main", "EXIT_SOURCE_FAILED"]


def _status(stats: StreamStats, stop: threading.Event, period: float = 0.5) -> None:
    while not stop.wait(period):
        print(f"\r{stats.line()}", end="", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=f"exit status: 0 done; {EXIT_INTERNAL} the backend failed, or a bug; "
                                f"{EXIT_BAD_INPUT} bad engine, source or option (nothing written); "
                                f"{EXIT_SOURCE_FAILED} the source failed mid-run: a camera or stream lost after "
                                "reconnection attempts with backoff, hanging, or a video cut short; "
                                f"{EXIT_OUTPUT_FAILED} an output could not be written mid-run (disk full); "
                                f"{EXIT_INTERRUPTED} interrupted (Ctrl-C), {EXIT_TERMINATED} terminated (SIGTERM). "
                                "After 3, 4, 130 and 143 every result before the fault is written, in whole lines.")
    p.add_argument("engine", help="engine file written by python -m engine.build")
    p.add_argument("--source", required=True, help="camera:N, /dev/videoN, rtsp/http URL, video file, image folder "
                   "or image file")
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
    return p


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path checked before anything runs: a bad one fails in one line, with nothing written."""
    for opt, path, folder in (("--out", args.out, False), ("--save-maps", args.save_maps, True),
                              ("--overlay-video", args.overlay_video, False)):
        if path:
            check_output(opt, path, folder)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch < 1:
        raise UserError("--batch must be at least 1")
    if args.max_fps is not None and args.max_fps <= 0:
        raise UserError("--max-fps must be positive")
    _check_outputs(args)
    engine = Engine(args.engine, args.threads)  # a bad engine fails here, before any output exists
    stats = StreamStats()
    with engine:  # the stream's threads are joined, then the backend's stopped, before the process exits
        code = _stream(args, engine, stats)
    if stats.capture_stuck:  # a source hanging inside read() cannot be joined: leave without tearing it down
        print("note: the source's reader hung and was abandoned", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _stream(args: argparse.Namespace, engine: Engine, stats: StreamStats) -> int:
    with_maps = bool(args.save_maps or args.overlay_video)
    results = run(engine, args.source, batch_size=args.batch, policy=args.policy, max_fps=args.max_fps,
                  with_maps=with_maps, stats=stats)
    sinks: list = []
    try:
        first = next(results, None)  # opens the source: a bad source fails here, before any output exists
        if args.out:
            sinks.append(JsonlSink(args.out))
        if args.save_maps:
            sinks.append(MapSink(args.save_maps, engine.threshold))
        if args.overlay_video:  # at the source's own rate where it states one (video, camera)
            sinks.append(VideoSink(args.overlay_video, engine.threshold, fps=stats.source_fps or args.max_fps or 10.0))
    except BaseException:
        results.close()  # joins the stream's threads
        for s in sinks:
            s.close()
        raise
    stop = threading.Event()
    status = threading.Thread(target=_status, args=(stats, stop), daemon=True)
    if not args.quiet:
        status.start()
    t0 = time.perf_counter()
    anomalous = 0
    failure: SourceError | None = None
    try:
        for r in itertools.chain([first] if first is not None else [], results):
            anomalous += bool(r.is_anomalous)
            for s in sinks:
                s.write(r)
            if args.out is None and r.error is None:
                print(f"{r.index}\t{r.source}\t{r.score:.4f}\t{'ANOMALOUS' if r.is_anomalous else 'ok'}")
            elif args.out is None:
                print(f"{r.index}\t{r.source}\terror: {r.error}")
    except SourceError as e:  # every result before the fault has been written; the sinks close below
        failure = e
    finally:  # also on Ctrl-C, SIGTERM and a sink's failure: the threads joined, every sink closed
        stop.set()
        results.close()
        closing = None
        for s in sinks:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001 - the others still close; the first failure is reported
                closing = closing or e
        if closing is not None and sys.exc_info()[0] is None:
            raise closing
    if not args.quiet:
        print(f"\r{stats.line()}", file=sys.stderr)
    print(f"{stats.frames} frames in {time.perf_counter() - t0:.1f} s: {stats.scored} scored, {anomalous} anomalous "
          f"(threshold {engine.threshold:.4f}), {stats.dropped} dropped, {stats.errors} errors; "
          f"{engine.backend_name} {engine.precision}", file=sys.stderr)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_SOURCE_FAILED
    return 0


if __name__ == "__main__":
    run_cli(main)
