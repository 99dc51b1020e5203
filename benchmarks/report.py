"""Turn a saved pytest-benchmark JSON of the suite into a markdown table and a bar chart.

    python -m benchmarks.report benchmarks/results*.json [--png benchmarks/speed.png] [--md benchmarks/speed.md]

Groups are "<configuration> | <what> | batch <n>"; each row gives the median, frames/s and the
speed-up over the group's PyTorch eager entry (measured in the same run). With several runs' files
(this VM's speed drifts by up to 1.5x within minutes), a row gives the median over runs of each
run's median, and the median and range over runs of each run's own speed-up. The chart (Pillow, no
plotting library) shows end-to-end frames/s per configuration, batch and implementation.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from engine.common.errors import UserError, run_cli


def _impl(bench: dict) -> str:
    """The implementation's parameter: pytest-benchmark saves it under params; else from the test's name."""
    if (bench.get("params") or {}).get("impl"):
        return bench["params"]["impl"]
    name = bench["name"]
    inner = name[name.index("[") + 1:-1] if "[" in name else name
    for impl in ("pytorch eager", "onnxruntime", "openvino", "native"):
        if impl in inner:
            return impl
    return inner


def load(path: Path) -> dict[str, dict[str, float]]:
    """group -> {implementation: median seconds}."""
    try:
        data = json.loads(path.read_text())
        benches = data["benchmarks"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a pytest-benchmark JSON file ({e})") from None
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in benches:
        groups[b["group"]][_impl(b)] = b["stats"]["median"]
    return dict(groups)


def combine(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Several runs' groups -> group -> {implementation: [median seconds of each run that has it]}."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for groups in runs:
        for group, impls in groups.items():
            for impl, t in impls.items():
                out[group][impl].append(t)
    return {g: dict(impls) for g, impls in out.items()}


def table(groups: dict[str, dict[str, list[float]]]) -> str:
    n_runs = max(len(ts) for impls in groups.values() for ts in impls.values())
    span = f" (range over {n_runs} runs)" if n_runs > 1 else ""
    lines = [f"| configuration | what | batch | implementation | median ms | frames/s | vs PyTorch eager{span} |",
             "|---|---|---|---|---|---|---|"]
    for group, impls in groups.items():
        config, what, batch = (part.strip() for part in group.split("|"))
        n = int(batch.split()[-1])
        ref = impls.get("pytorch eager")
        for impl, ts in sorted(impls.items(), key=lambda kv: statistics.median(kv[1])):
            t = statistics.median(ts)
            ratio = ""
            if ref and len(ref) == len(ts):  # each run's own ratio: both sides timed in that run
                ratios = [r / x for r, x in zip(ref, ts)]
                ratio = f"{statistics.median(ratios):.2f}x" + (
                    f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")
            lines.append(f"| {config} | {what} | {n} | {impl} | {t * 1e3:.2f} | {n / t:.1f} | {ratio} |")
    return "\n".join(lines)


def chart(groups: dict[str, dict[str, list[float]]], out: Path) -> None:
    bars = [(g.split("|")[0].strip(), g.split("|")[2].strip(), impl, int(g.split()[-1]) / statistics.median(ts))
            for g, impls in groups.items() if "end to end" in g for impl, ts in impls.items()]
    if not bars:
        raise UserError("no end-to-end results to chart")
    colours = {"pytorch eager": (150, 150, 150), "onnxruntime": (70, 130, 180), "openvino": (220, 110, 40),
               "openvino bf16-flow": (200, 60, 60), "openvino bf16-deep": (150, 30, 90)}
    width, row, left = 900, 22, 330
    img = Image.new("RGB", (width, 40 + row * len(bars)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), "end to end, frames/s (higher is better)", fill="black")
    top = max(b[3] for b in bars)
    for i, (config, batch, impl, fps) in enumerate(bars):
        y = 35 + i * row
        draw.text((10, y + 4), f"{config}, {batch}, {impl}", fill="black")
        draw.rectangle([left, y, left + int((width - left - 70) * fps / top), y + row - 6],
                       fill=colours.get(impl, (100, 100, 100)))
        draw.text((left + int((width - left - 70) * fps / top) + 5, y + 4), f"{fps:.1f}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="pytest-benchmark JSON (--benchmark-json) of the suite; "
                   "several runs' files are combined (medians over runs)")
    p.add_argument("--md", type=Path, default=Path("benchmarks/speed.md"), help="markdown table to write")
    p.add_argument("--png", type=Path, default=Path("benchmarks/speed.png"), help="bar chart to write")
    args = p.parse_args(argv)
    groups = combine([load(path) for path in args.results])
    md = table(groups)
    args.md.write_text(md + "\n")
    chart(groups, args.png)
    print(md)
    print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
    run_cli(main)
