"""Two checkouts of lineflow timed in turns on their own engines: did a change of the code move the speed?

    python research/trees_ab.py BEFORE_DIR BEFORE_AUTO.engine BEFORE_TORCH.engine \\
                                AFTER_DIR AFTER_AUTO.engine AFTER_TORCH.engine --frames DIR [--turns 4]

Each turn runs each checkout's own interpreter (DIR/.venv-checks, else DIR/.venv) on its own code and engines:
16 frames of DIR through `Engine.infer` of both engines, 5 rounds, and prints the median ms per frame of each.
The two sides of check 6's ratio (the auto-built engine, the torch reference) are so timed apart.
"""
import argparse
import subprocess
import sys
from pathlib import Path

TIME_ONE_TREE = r'''
import glob, statistics, sys, time
import numpy as np
from PIL import Image
import engine
fast, ref = engine.load(sys.argv[1]), engine.load(sys.argv[2])
frames = [np.array(Image.open(p).convert("RGB")) for p in sorted(glob.glob(sys.argv[3] + "/*"))[:16]]
for e in (fast, ref):
    for f in frames[:3]:
        e.infer(f)
ms = {"auto": [], "torch": []}
for _ in range(5):
    for name, e in (("auto", fast), ("torch", ref)):
        t0 = time.perf_counter()
        for f in frames:
            e.infer(f)
        ms[name].append((time.perf_counter() - t0) * 1000 / len(frames))
print(f"auto {statistics.median(ms['auto']):.2f} torch {statistics.median(ms['torch']):.2f} ms/frame")
'''


def python_of(tree: Path) -> str:
    for venv in (".venv-checks", ".venv"):
        if (tree / venv / "bin" / "python").exists():
            return str(tree / venv / "bin" / "python")
    sys.exit(f"{tree}: no .venv-checks or .venv with a python")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", nargs=3, metavar=("DIR", "AUTO", "TORCH"))
    p.add_argument("after", nargs=3, metavar=("DIR", "AUTO", "TORCH"))
    p.add_argument("--frames", required=True)
    p.add_argument("--turns", type=int, default=4)
    args = p.parse_args()
    for turn in range(1, args.turns + 1):
        for name, (tree, auto, torch) in (("before", args.before), ("after", args.after)):
            tree = Path(tree).resolve()
            out = subprocess.run([python_of(tree), "-c", TIME_ONE_TREE, auto, torch, args.frames], cwd=tree,
                                 capture_output=True, text=True)
            print(f"turn {turn} {name}: {(out.stdout or out.stderr).strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
