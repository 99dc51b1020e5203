"""What the Prometheus metrics cost the line: frames/s through engine.run with and without --metrics, and scraped.

    python -m pytest benchmarks/test_metrics_speed.py --benchmark-columns=median,iqr,rounds

The default model (efficientnet_lite2 at 256², random flow weights: speed does not depend on them) built for
this CPU with `--backend auto`; 96 frames of 256x256 uint8 through engine.run (policy block, batch 1, no maps:
--metrics needs none), every result handed to the sinks as `python -m engine.run` does. Three variants in one run:
- plain: no metrics;
- metrics: a MetricsSink on a free loopback port, nobody scraping;
- metrics + scraper: the same, scraped by another process ten times a second (Prometheus scrapes every 15 s or so:
  this is a hundred times harsher).
Issue 46: a sink must not cost more than 5 % of frames/s: median(plain) / median(metrics + scraper).
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

N_FRAMES = 96

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
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(N_FRAMES)]


def _stream(eng, frames, sinks) -> int:
    import engine
    n = 0
    for r in engine.run(eng, list(frames), policy="block", with_maps=False):
        for s in sinks:
            s.write(r)
        n += r.error is None
    return n


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
        n = benchmark.pedantic(_stream, args=(default_engine, frames, [sink] if sink else []), rounds=3,
                               warmup_rounds=1)
        assert n == N_FRAMES
        if scraper is not None:
            assert sink.scrapes > 0, "never scraped"
            benchmark.extra_info["scrapes"] = sink.scrapes
        if sink is not None:
            text = urllib.request.urlopen(sink.url, timeout=5).read().decode()
            assert f'lineflow_frames_total{{camera="bench"}} {4.0 * N_FRAMES}' in text, "not every result counted"
    finally:
        if scraper is not None:
            scraper.kill()
            scraper.wait(10)
        if sink is not None:
            sink.close()
