"""Turn a saved pytest-benchmark JSON of the suite into a markdown table and a bar chart.

    python -m benchmarks.report benchmarks/results.json [--png benchmarks/speed.png] [--md benchmarks/speed.md]

Groups are "<configuration> | <what> | batch <n>"; each row gives the median, frames/s and the
speed-up over the group's PyTorch eager entry (measured in the same run). The chart (Pillow, no
plotting library) shows end-to-end frames/s per configuration, batch and implementation.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from train.cli import UserError, run_cli


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


def table(groups: dict[str, dict[str, float]]) -> str:
    lines = ["| configuration | what | batch | implementation | median ms | frames/s | vs PyTorch eager |",
             "|---|---|---|---|---|---|---|"]
    for group, impls in groups.items():
        config, what, batch = (part.strip() for part in group.split("|"))
        n = int(batch.split()[-1])
        ref = impls.get("pytorch eager")
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            ratio = f"{ref / t:.2f}x" if ref else ""
            lines.append(f"| {config} | {what} | {n} | {impl} | {t * 1e3:.2f} | {n / t:.1f} | {ratio} |")
    return "\n".join(lines)


def chart(groups: dict[str, dict[str, float]], out: Path) -> None:
    bars = [(g.split("|")[0].strip(), g.split("|")[2].strip(), impl, int(g.split()[-1]) / t)
            for g, impls in groups.items() if "end to end" in g for impl, t in impls.items()]
    if not bars:
        raise UserError("no end-to-end results to chart")
    colours = {"pytorch eager": (150, 150, 150), "onnxruntime": (70, 130, 180), "openvino": (220, 110, 40)}
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
    p.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json) of the suite")
    p.add_argument("--md", type=Path, default=Path("benchmarks/speed.md"), help="markdown table to write")
    p.add_argument("--png", type=Path, default=Path("benchmarks/speed.png"), help="bar chart to write")
    args = p.parse_args(argv)
    groups = load(args.results)
    md = table(groups)
    args.md.write_text(md + "\n")
    chart(groups, args.png)
    print(md)
    print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
    run_cli(main)
