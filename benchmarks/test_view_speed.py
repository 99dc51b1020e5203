"""What the live view costs the line: frames/s through engine.run with and without --view, and with a viewer.

    python -m pytest benchmarks/test_view_speed.py --benchmark-columns=median,iqr,rounds

The default model (efficientnet_lite2 at 256², random flow weights: speed does not depend on them) built for
this CPU with `--backend auto`; 96 frames of 256x256 uint8 through engine.run (policy block, batch 1), every
result handed to the sinks as `python -m engine.run` does. Three variants in one run:
- plain: no view (maps not even computed);
- view: a LiveView sink on a free loopback port, nobody watching (maps computed for it);
- view + viewer: the same with a viewer in another process, as a browser does: long-polling /frame.jpg
  and fetching /stats.json twice a second.
Issue 21: a connected viewer must not cost more than 10 % of frames/s: median(plain) / median(view + viewer).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks.sink_cost import N_FRAMES, random_frames, stream_through

VIEWER = textwrap.dedent("""
    import sys, time, urllib.request
    base, seq, last_stats = sys.argv[1], 0, 0.0
    while True:
        try:
            with urllib.request.urlopen(f"{base}frame.jpg?after={seq}", timeout=15) as r:
                seq = int(r.headers.get("X-Seq") or seq)
                r.read()
            if time.monotonic() - last_stats > 0.5:
                urllib.request.urlopen(f"{base}stats.json", timeout=5).read()
                last_stats = time.monotonic()
        except OSError:
            time.sleep(0.1)
""")


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    import engine
    from benchmarks.stages import build_default_engine
    eng = engine.load(build_default_engine(tmp_path_factory.mktemp("view")), torch.get_num_threads())
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def frames():
    return random_frames()


@pytest.mark.parametrize("variant", ["plain", "view", "view + viewer"])
def test_engine_run_frames(benchmark, default_engine, frames, variant):
    from engine.sinks import LiveView
    benchmark.group = f"engine.run, {N_FRAMES} frames of 256x256 ({default_engine.backend_name} "
    benchmark.group += f"{default_engine.precision})"
    benchmark.extra_info["frames"] = N_FRAMES
    view = LiveView("127.0.0.1:0", default_engine.threshold) if variant != "plain" else None
    viewer = None
    if variant == "view + viewer":
        viewer = subprocess.Popen([sys.executable, "-c", VIEWER, f"http://127.0.0.1:{view.port}/"])
    try:
        n = benchmark.pedantic(stream_through, args=(default_engine, frames, [view] if view else [], view is not None),
                               rounds=3, warmup_rounds=1)
        assert n == N_FRAMES
        if viewer is not None:
            assert view.served > 0, "the viewer was served no frame"
            benchmark.extra_info["overlays_served"] = view.served
    finally:
        if viewer is not None:
            viewer.kill()
            viewer.wait(10)
        if view is not None:
            view.close(completed=False)
