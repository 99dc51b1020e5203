"""What the Prometheus metrics cost the line: frames/s through engine.run with and without --metrics, and scraped.

    python -m pytest benchmarks/test_metrics_speed.py --benchmark-columns=median,iqr,rounds

The default model (efficientnet_lite2 at 256², random flow weights: speed does not depend on them) built for
this CPU with `--backend auto`; 96 frames of 256x256 uint8 through engine.run (policy block, batch 1, no maps:
--metrics needs none), every result handed to the sinks as `python -m engine.run` does. Three variants in one run:
- plain: no metrics;
- metrics: a MetricsSink on a free loopback port, nobody scraping;
- metrics + scraper: the same, scraped by another process ten times a second (Prometheus scrapes every 15 s or so:
  this is a hundred times harsher).
pytest-benchmark times the variants one after another, and this machine's speed drifts between them (more than the
cost measured); so test_metrics_cost_interleaved also times plain and metrics + scraper round by round, in turn, and
prints the median of the per-round ratios, and what one MetricsSink.write costs (microseconds per result).
Issue 46: a sink must not cost more than 5 % of frames/s.
"""

import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from benchmarks.sink_cost import N_FRAMES, random_frames, stream_through

ROUNDS = 5

SCRAPER = textwrap.dedent("""
    import sys, time, urllib.request
    while True:
        try:
            urllib.request.urlopen(sys.argv[1], timeout=5).read()
        except OSError:
            pass
        time.sleep(0.1)
""")


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    import engine
    from benchmarks.stages import build_default_engine
    eng = engine.load(build_default_engine(tmp_path_factory.mktemp("metrics")), torch.get_num_threads())
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def frames():
    return random_frames()


@pytest.mark.parametrize("variant", ["plain", "metrics", "metrics + scraper"])
def test_engine_run_frames(benchmark, default_engine, frames, variant):
    import urllib.request

    from engine.sinks.metrics import MetricsSink
    benchmark.group = f"engine.run, {N_FRAMES} frames of 256x256 ({default_engine.backend_name} "
    benchmark.group += f"{default_engine.precision})"
    benchmark.extra_info["frames"] = N_FRAMES
    sink = MetricsSink("127.0.0.1:0", "bench", default_engine) if variant != "plain" else None
    scraper = None
    if variant == "metrics + scraper":
        scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, sink.url])
    try:
        n = benchmark.pedantic(stream_through, args=(default_engine, frames, [sink] if sink else []), rounds=ROUNDS,
                               warmup_rounds=1)
        assert n == N_FRAMES
        if scraper is not None:
            assert sink.scrapes > 0, "never scraped"
            benchmark.extra_info["scrapes"] = sink.scrapes
        if sink is not None:
            text = urllib.request.urlopen(sink.url, timeout=5).read().decode()
            counted = f'lineflow_frames_total{{camera="bench"}} {float((ROUNDS + 1) * N_FRAMES)}'
            assert counted in text, "not every result counted"
    finally:
        if scraper is not None:
            scraper.kill()
            scraper.wait(10)
        if sink is not None:
            sink.close()


def test_metrics_cost_interleaved(default_engine, frames):
    """plain and metrics + scraper timed in turn, round by round: the cost is the median of per-round frames/s
    ratios; beside it the time of one write (a scored result), timed alone."""
    from engine.results import Result
    from engine.sinks.metrics import MetricsSink
    sink = MetricsSink("127.0.0.1:0", "bench", default_engine)
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, sink.url])
    ratios, plain_fps, metrics_fps = [], [], []
    try:
        stream_through(default_engine, frames, [])  # warm-up
        for _ in range(7):
            t = time.perf_counter()
            stream_through(default_engine, frames, [])
            plain = N_FRAMES / (time.perf_counter() - t)
            time.sleep(0.05)
            t = time.perf_counter()
            stream_through(default_engine, frames, [sink])
            with_metrics = N_FRAMES / (time.perf_counter() - t)
            time.sleep(0.05)
            plain_fps.append(plain)
            metrics_fps.append(with_metrics)
            ratios.append(plain / with_metrics)
        scrapes = sink.scrapes
        result = Result(0.5, False, captured_perf=time.perf_counter(), engine="e", threshold=1.0)
        n = 100_000
        t = time.perf_counter()
        for _ in range(n):
            sink.write(result)
        write_us = (time.perf_counter() - t) / n * 1e6
    finally:
        scraper.kill()
        scraper.wait(10)
        sink.close()
    cost = statistics.median(ratios) - 1
    print(f"\nPrometheus metrics scraped 10 times a second: {statistics.median(plain_fps):.1f} frames/s plain, "
          f"{statistics.median(metrics_fps):.1f} with --metrics; cost {100 * cost:+.1f} % (median of {len(ratios)} "
          f"per-round ratios; {default_engine.backend_name} {default_engine.precision}; {scrapes} scrapes); one "
          f"write {write_us:.2f} us")
    assert scrapes > 0
