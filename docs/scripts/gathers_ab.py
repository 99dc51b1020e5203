"""The flow's gathers as Gather nodes against 1x1 convolutions, end to end, interleaved call by call (2026-12-02).

    python docs/scripts/gathers_ab.py model.pt torch.engine FRAMES_DIR

Builds `model.pt` twice for OpenVINO fp32 (the two forms of engine/builder/graph.py's FoldedScale), loads the
PyTorch reference engine beside them, and times 9 rounds of 16 calls each, the three taking turns: prepared
(1, 3, 256, 256) inputs through `infer_prepared`, then the first 16 images of FRAMES_DIR through `Engine.infer`.
"""
import contextlib
import glob
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import engine  # noqa: E402
import engine.builder.graph as G  # noqa: E402
from engine.builder import BuildConfig, build_engine  # noqa: E402
from train.checkpoint import load_model  # noqa: E402

m, meta = load_model(sys.argv[1])
raw = open(sys.argv[1], "rb").read()
init = G.FoldedScale.__init__
paths = {}
tmp = tempfile.mkdtemp()
for gathers in (False, True):
    def patched(self, *a, gathers=gathers, **k):
        init(self, *a, **k)
        self.gathers = gathers
    G.FoldedScale.__init__ = patched
    out = f"{tmp}/gathers-{gathers}.engine"
    with contextlib.redirect_stdout(io.StringIO()):
        build_engine(m, meta, raw, out, BuildConfig("openvino", "fp32"))
    paths[gathers] = out
G.FoldedScale.__init__ = init
engs = {("gathers" if g else "1x1 conv"): engine.load(p) for g, p in paths.items()}
engs["torch"] = engine.load(sys.argv[2])
frames = [np.array(Image.open(p).convert("RGB")) for p in sorted(glob.glob(sys.argv[3] + "/*"))[:16]]
x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
for e in engs.values():
    for f in frames[:3]:
        e.infer(f)


def rounds(call) -> dict[str, list[float]]:
    """ms a call, per round, the engines taking turns."""
    times = {k: [] for k in engs}
    for _ in range(9):
        for k, e in engs.items():
            t0 = time.perf_counter()
            for i in range(16):
                call(e, i)
            times[k].append((time.perf_counter() - t0) / 16 * 1e3)
    return times


for what, times in (("prepared", rounds(lambda e, i: e.infer_prepared(x))),
                    ("Engine.infer", rounds(lambda e, i: e.infer(frames[i % len(frames)])))):
    for k, v in times.items():
        print(f"{what} {k}: median {statistics.median(v):.1f} ms, rounds {[round(a, 1) for a in v]}")
