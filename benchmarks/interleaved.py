"""End-to-end speed-ups with the sides timed call by call in turn: the ratio check that this VM's drift cannot bend.

    python -m benchmarks.interleaved [--rounds 15] [--batches 1 8]

pytest-benchmark (benchmarks/test_suite_speed.py) times each implementation's rounds back to back, so
a ratio's two sides are seconds apart; this machine's speed moves by up to 1.5x within minutes. Here
each round calls every implementation once, in turn, and a ratio is the median over rounds of the
per-round ratio. A pause between calls lets the previous library's worker threads stop spinning (ONNX
Runtime's and OpenMP's spin after each call, and on 2 cores they would slow whichever side runs next).
Same models, engines and inputs as the suite; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.stages import CONFIGS, build_engines, make_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interleaved", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (each calls every implementation once)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pause", type=float, default=0.05, help="seconds between calls")
    args = p.parse_args(argv)
    print("| configuration | batch | implementation | median ms | frames/s | vs PyTorch eager (median of rounds) |")
    print("|---|---|---|---|---|---|")
    for config_name, config in CONFIGS.items():
        model = make_model(config)
        with tempfile.TemporaryDirectory() as tmp:
            runners = {"pytorch eager": lambda x, m=model: m(torch.from_numpy(x)), **build_engines(model, Path(tmp))}
            for batch in args.batches:
                x = np.random.default_rng(0).random((batch, 3, *config.input_size), dtype=np.float32)
                times: dict[str, list[float]] = {name: [] for name in runners}
                with torch.no_grad():
                    for r in range(args.rounds + 1):  # round 0 warms up
                        for name, run in runners.items():
                            time.sleep(args.pause)
                            t0 = time.perf_counter()
                            run(x)
                            if r:
                                times[name].append(time.perf_counter() - t0)
                eager = times["pytorch eager"]
                for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
                    t = statistics.median(ts)
                    ratio = statistics.median(e / s for e, s in zip(eager, ts))
                    print(f"| {config_name} | {batch} | {name} | {t * 1e3:.1f} | {batch / t:.1f} | {ratio:.2f}x |",
                          flush=True)


if __name__ == "__main__":
    main()
