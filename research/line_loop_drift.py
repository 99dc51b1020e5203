"""Issue 44's drift target: BSD streamed in capture order raises input drift within 10 frames of the later capture
setting's first frame and none before it; MTD's good frames raise none; and the line-loop check's part 3.

    python research/line_loop_drift.py [--models bsd.pt mtd.pt] [--line-loop] [--work DIR] [--json OUT]

Per model: where its model.pt predates input_stats (format < 7), the statistics are computed with train's own
function (train.input_stats) over the training folder the model records (meta.data.root, train/good) and written
into a copy of the model (WORK/<stem>-stats.pt); the copy is built (onnxruntime fp32) and every frame of the streams
below is scored once by the engine and measured once (engine.common.frame_stats), cached in WORK. Then each drift
setting tried is replayed over each stream through engine.drift.DriftMonitor.update, the same code engine.run runs
on live frames (the default setting is also run end to end through engine.stream.run and checked equal).

Streams (each in a stated order; "change": the index of the first frame of the new setting):
    bsd train            train/good in capture order (the file name's yymmddhhmmss): the later setting at its end
    bsd test             test/good + test/pitting in capture order
    bsd good             train/good + test/good in capture order
    mtd train / test good / good   train/good, test/good, both, in name order (exp1..exp6: six lighting levels)
    <data> gain 0.4      the first 40 frames of a stream, then the same 40 at 0.4 gain (the line-loop check's change)
--line-loop adds the check's own case: a model fitted as ../shared/checks/lib.sh fits it (40 MTD frames, 128 px,
2 epochs) and its steady (48 frames) and changed (40 + 40 at 0.4 gain) streams.

The default is chosen by label-free criteria, on the training streams only (bsd train, mtd train, and gain
streams made of training frames; see choose()): no input drift raised on a stable stretch, every change raised as
soon as the window's median turns, then the most tolerant margin and floor. The test streams report it. Every
setting's numbers are printed and written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.common.frame_stats import frame_stats  # noqa: E402
from engine.common.images import images_in, read_image  # noqa: E402
from engine.drift import DriftMonitor, DriftSettings  # noqa: E402
from engine.results import Result  # noqa: E402
from engine.runtime import Engine  # noqa: E402

GAIN, GAIN_AFTER = 0.4, 40  # the line-loop check's change: the same frames at 0.4 gain after 40 frames
# the streams also run end to end (engine.stream.run with the default monitor), checked equal to the replay
END_TO_END = ("bsd test", "bsd test good", "mtd test good", "bsd test gain 0.4", "mtd test gain 0.4", "check steady",
              "check changed")
INPUT_TRIED = [dict(input_window=w, input_levels=lv, size_levels=(0.05, 0.95), input_margin=m, input_floor=f)
               for w in (5, 9, 15) for lv in ((0.0, 1.0), (0.01, 0.99), (0.05, 0.95)) for m in (0.0, 0.1, 0.25, 0.5)
               for f in (0.0, 0.05)]
INPUT_TRIED += [dict(input_window=9, input_levels=(0.01, 0.99), size_levels=slv, input_margin=0.25, input_floor=0.05)
                for slv in ((0.0, 1.0), (0.01, 0.99), (0.025, 0.975))]
SCORE_TRIED = [dict(score_window=w, score_level=lv, score_clear_level=clear) for w in (9, 25, 51)
               for lv, clear in ((0.75, 0.5), (0.9, 0.75), (0.95, 0.9))]


def capture_time(p: Path) -> str:
    return p.name.split("_")[1]  # BSD: 01_<yymmddhhmmss>_<position>_<angle>_crop_<n>.jpg


def with_stats(model_path: Path, work: Path) -> tuple[Path, dict]:
    """model.pt with input_stats: itself, or a copy with them computed by train's own function (said so)."""
    from train.checkpoint import load_model, save_model
    from train.data import train_images
    from train.input_stats import input_stats
    model, meta = load_model(model_path)
    if meta.input_stats is not None:
        return model_path, {"stats": "recorded by train.fit"}
    out = work / f"{model_path.stem}-stats.pt"
    info = {"stats": f"computed by train.input_stats over {meta.data.root} (train/good), written into {out}"}
    if not out.exists():
        paths = train_images(meta.data.root)
        t0 = time.perf_counter()
        stats = input_stats(paths)
        info["input_stats_s"] = time.perf_counter() - t0
        info["input_stats_frames"] = len(paths)
        save_model(out, model, replace(meta, input_stats=stats))
        (work / f"{out.stem}.json").write_text(json.dumps(info))
    return out, json.loads((work / f"{out.stem}.json").read_text())


def built(model_pt: Path, work: Path) -> Path:
    out = work / f"{model_pt.stem}.engine"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "engine.build", str(model_pt), "-o", str(out), "--backend", "onnxruntime",
                        "--precision", "fp32"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def load_frame(key: str) -> np.ndarray:
    """A stream's frame as engine.run's folder source gives it: the file decoded (float RGB), or the check's
    darkened copy (uint8 RGB: the PNG it writes, decoded, is the same pixels)."""
    if key.startswith("gain:"):
        a = np.asarray(Image.open(key[5:]).convert("RGB")).astype(np.float32) * GAIN
        return a.clip(0, 255).astype(np.uint8)
    return read_image(key)


def measured(eng: Engine, keys: list[str], cache: Path) -> dict[str, tuple]:
    """Per frame: (height, width), frame_stats, the engine's score; cached per engine id."""
    known = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [k for k in dict.fromkeys(keys) if k not in known]
    for i in range(0, len(todo), 8):
        frames = [load_frame(k) for k in todo[i:i + 8]]
        for k, f, r in zip(todo[i:i + 8], frames, eng.score(frames, with_maps=False)):
            known[k] = [list(f.shape[:2]), frame_stats(f).tolist(), r.score]
        if i % 200 == 0:
            print(f"  scored {i + len(frames)} of {len(todo)} frames", file=sys.stderr)
            cache.write_text(json.dumps(known))
    cache.write_text(json.dumps(known))
    return {k: (tuple(v[0]), np.array(v[1]), v[2]) for k, v in known.items()}


def replay(eng: Engine, rows: list[tuple], settings: DriftSettings) -> tuple[list, list]:
    """The monitor over one stream: per frame the kinds in force, and the events."""
    mon = DriftMonitor.from_header(eng.header, eng.engine_id, settings)
    drift = []
    for i, (size, stats, score) in enumerate(rows):
        r = Result(score, score > eng.threshold, index=i, engine=eng.engine_id)
        mon.update(size, stats, r)
        drift.append(r.drift)
    return drift, mon.events_until()


def figures(drift: list, events: list, kind: str, change: int | None) -> dict:
    """For one kind: raises (events), frames in force, raises before the change, the delay (the new setting's
    frames seen when it was raised, its first = 1), whether in force at the end."""
    raises = [e.index for e in events if e.kind == kind and e.raised]
    out = {"raises": len(raises), "first_raise": raises[0] if raises else None,
           "frames_in_force": sum(1 for d in drift if d and kind in d)}
    if change is not None:
        out["raises_before_change"] = sum(1 for i in raises if i < change)
        after = [i for i in raises if i >= change]
        out["delay"] = after[0] - change + 1 if after else None
    return out


def streams_of(data: Path, name: str) -> dict[str, tuple[list[str], int | None, str]]:
    """name -> (frame keys in order, the change's index or None, "train" (choice) or "test" (report))."""
    train = images_in(data / "train" / "good")
    good = images_in(data / "test" / "good")
    test = [p for d in sorted((data / "test").iterdir()) if d.is_dir() for p in images_in(d)]
    out = {}
    if name == "bsd":
        order = lambda ps: sorted(ps, key=lambda p: (capture_time(p), p.name))  # noqa: E731
        later = lambda ps: next(i for i, p in enumerate(ps) if read_size(p) == (645, 1540))  # noqa: E731
        for label, ps, role in (("train", order(train), "train"), ("test", order(test), "test"),
                                ("test good", order(good), "test"), ("good", order(train + good), "test")):
            out[f"bsd {label}"] = ([str(p) for p in ps], later(ps), role)
        first = order(train)[:GAIN_AFTER]
        tfirst = order(test)[:GAIN_AFTER]
    else:
        for label, ps, role in (("train", train, "train"), ("test good", good, "test"),
                                ("good", sorted(train + good, key=lambda p: p.name), "test")):
            out[f"mtd {label}"] = ([str(p) for p in ps], None, role)
        first, tfirst = train[:GAIN_AFTER], good[:GAIN_AFTER]
    for label, ps, role in (("train", first, "train"), ("test", tfirst, "test")):
        out[f"{name} {label} gain {GAIN}"] = ([str(p) for p in ps] + [f"gain:{p}" for p in ps], GAIN_AFTER, role)
    return out


def read_size(p: Path) -> tuple[int, int]:
    with Image.open(p) as im:
        return im.height, im.width


def line_loop_case(work: Path) -> tuple[Path, dict]:
    """The check's model (lib.sh: mtd_subset + tiny_model) and its steady / changed streams."""
    mtd = ROOT.parent / "shared" / "data" / "mtd"
    sub = work / "subset"
    if not (sub / "train" / "good").is_dir():
        for part, n in (("train/good", 40), ("test/good", 16)):
            (sub / part).mkdir(parents=True, exist_ok=True)
            for p in sorted((mtd / part).iterdir())[:n]:
                (sub / part / p.name).symlink_to(p)
    model = work / "tiny.pt"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "train.fit", "--data", str(sub), "--out", str(model), "--input-size",
                        "128", "--epochs", "2", "--batch-size", "8", "--seed", "0"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    good = images_in(sub / "test" / "good") + images_in(sub / "train" / "good")
    return model, {"check steady": ([str(p) for p in good[:48]], None, "test"),
                   "check changed": ([str(p) for p in good[:40]] + [f"gain:{p}" for p in good[:40]], 40, "test")}


def end_to_end(eng: Engine, keys: list[str], work: Path, name: str) -> list:
    """The default setting through engine.stream.run on a folder of the stream's frames (links, in order); the
    results' drift fields, cached per engine, stream and default setting."""
    from engine.stream import run
    cache = work / f"e2e-{eng.engine_id}-{name.replace(' ', '-')}.json"
    setting = json.dumps(asdict(DriftSettings()))
    if cache.exists() and json.loads(cache.read_text())["setting"] == setting:
        return json.loads(cache.read_text())["drift"]
    folder = work / f"stream-{name.replace(' ', '-')}"
    if not folder.is_dir():
        folder.mkdir()
        for i, k in enumerate(keys):
            if k.startswith("gain:"):
                Image.fromarray(load_frame(k)).save(folder / f"{i:05d}.png")
            else:
                (folder / f"{i:05d}{Path(k).suffix}").symlink_to(k)
    mon = DriftMonitor.for_engine(eng)
    drift = [r.drift for r in run(eng, str(folder), with_maps=False, drift=mon)]
    cache.write_text(json.dumps({"setting": setting, "drift": drift}))
    return drift


def frame_cost(path: Path) -> dict:
    """frame_stats on a BSD frame: uint8 (a camera's) and float32 (a decoded file's), hot (the same frame again)
    and cold (a different frame each call: not in cache), median over calls, in ms."""
    frames = [read_image(p) for p in sorted(path.iterdir())[:40]]
    out = {"frame": f"{frames[0].shape[1]}x{frames[0].shape[0]}"}
    for label, fs in (("uint8", [(f * 255).round().astype(np.uint8) for f in frames]), ("float32", frames)):
        for mode in ("hot", "cold"):
            t = []
            for i in range(400):
                f = fs[0] if mode == "hot" else fs[i % len(fs)]
                t0 = time.perf_counter()
                frame_stats(f)
                t.append(time.perf_counter() - t0)
            out[f"{label}_{mode}_ms"] = float(np.median(t) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["/work/models/bsd-s0.pt", "/work/models/mtd-s0.pt"])
    p.add_argument("--line-loop", action="store_true", help="also the line-loop check's own model and streams")
    p.add_argument("--work", default="/tmp/lineflow-drift")
    p.add_argument("--json", default="line_loop_drift.json")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = []  # (label, engine path, streams, model info)
    for m in map(Path, args.models):
        model_pt, info = with_stats(m, work)
        from train.checkpoint import load_model
        data = Path(load_model(model_pt)[1].data.root)
        name = "bsd" if "bsd" in data.name else "mtd"
        cases.append((m.stem, built(model_pt, work), streams_of(data, name), {**info, "model": str(m)}))
    if args.line_loop:
        model_pt, streams = line_loop_case(work)
        cases.append(("check tiny", built(model_pt, work), streams,
                      {"model": "lib.sh tiny_model", "stats": "recorded by train.fit"}))

    report = {"input_tried": INPUT_TRIED, "score_tried": SCORE_TRIED, "cases": {}}
    bsd = ROOT.parent / "shared" / "data" / "bsd" / "train" / "good"
    report["frame_stats_cost"] = frame_cost(bsd) if bsd.is_dir() else None
    results = []  # (setting kind, setting index, stream, role, figures)
    for label, engine_path, streams, info in cases:
        with Engine(engine_path) as eng:
            print(f"{label}: engine {eng.engine_id} ({engine_path}); {info['stats']}", file=sys.stderr)
            rows = measured(eng, [k for keys, _, _ in streams.values() for k in keys],
                            work / f"measured-{eng.engine_id}.json")
            case = {**info, "engine": eng.engine_id, "streams": {}}
            for sname, (keys, change, role) in streams.items():
                case["streams"][sname] = {"frames": len(keys), "change": change, "role": role}
                stream_rows = [rows[k] for k in keys]
                for kind, tried in (("input", INPUT_TRIED), ("score", SCORE_TRIED)):
                    for i, setting in enumerate(tried):
                        drift, events = replay(eng, stream_rows, DriftSettings(**setting))
                        results.append((kind, i, f"{label}: {sname}", role, figures(drift, events, kind, change)))
                drift, events = replay(eng, stream_rows, DriftSettings())
                case["streams"][sname]["default"] = {k: figures(drift, events, k, change) for k in ("input", "score")}
                if sname in END_TO_END:
                    live = end_to_end(eng, keys, work, f"{label}-{sname}")
                    case["streams"][sname]["end_to_end_equal"] = live == drift
                case["streams"][sname]["events"] = [e.line() for e in events]
            report["cases"][label] = case

    chosen = choose(results)
    report["chosen_input"] = INPUT_TRIED[chosen] if chosen is not None else None
    report["default"] = asdict(DriftSettings())
    report["settings"] = [{"kind": k, "setting": (INPUT_TRIED if k == "input" else SCORE_TRIED)[i], "stream": s,
                           "role": role, **f} for k, i, s, role, f in results]
    print_tables(report, results)
    Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    print(f"\nwrote {args.json}")


def choose(results: list) -> int | None:
    """Label-free, on the training streams only. By design (engine/drift.py says why): the window (9) and the quantile
    levels of brightness and contrast (1-99 %) and of sizes (5-95 %). Then, of the margins and floors tried: those
    that raise nothing on a stable stretch and raise every change as soon as the window's median turns (its
    window // 2 + 1-th frame); of those the largest margin, then the larger floor: the most tolerant that still
    raises at once."""
    d = DriftSettings()
    ok = []
    for i, setting in enumerate(INPUT_TRIED):
        if (setting["input_window"], setting["input_levels"], setting["size_levels"]) != (
                d.input_window, d.input_levels, d.size_levels):
            continue
        rows = [f for k, j, s, role, f in results if k == "input" and j == i and role == "train"]
        stable = all(f.get("raises_before_change", f["raises"]) == 0 for f in rows)
        at_once = all(f["delay"] == d.input_window // 2 + 1 for f in rows if "delay" in f)
        if stable and at_once:
            ok.append((-setting["input_margin"], -setting["input_floor"], i))
    return min(ok)[-1] if ok else None


def print_tables(report: dict, results: list) -> None:
    for label, case in report["cases"].items():
        print(f"\n{label} (engine {case['engine']}; {case['stats']})")
        print("| stream | frames | change at | input: raises before / delay / frames in force | score: raises / "
              "first / frames in force | end to end = replay |\n|---|---|---|---|---|---|")
        for s, v in case["streams"].items():
            i, sc = v["default"]["input"], v["default"]["score"]
            print(f"| {s} | {v['frames']} | {v['change']} | {i.get('raises_before_change', i['raises'])} / "
                  f"{i.get('delay', '-')} / {i['frames_in_force']} | {sc['raises']} / {sc['first_raise']} / "
                  f"{sc['frames_in_force']} | {v.get('end_to_end_equal', 'not run')} |")
    for kind, tried in (("input", INPUT_TRIED), ("score", SCORE_TRIED)):
        streams = list(dict.fromkeys(s for k, _, s, _, _ in results if k == kind))
        print(f"\n{kind} settings tried: per stream, raises (before the change, where there is one) / delay")
        print("| setting | " + " | ".join(streams) + " |\n|---|" + "---|" * len(streams))
        for i, setting in enumerate(tried):
            cells = []
            for s in streams:
                f = next(f for k, j, s2, _, f in results if k == kind and j == i and s2 == s)
                cells.append(f"{f.get('raises_before_change', f['raises'])} / {f.get('delay', '-')}")
            print(f"| {json.dumps(list(setting.values()))} | " + " | ".join(cells) + " |")
    print(f"\nchosen input setting (label-free, training streams): {report['chosen_input']}; "
          f"engine.drift's default: {report['default']}")
    if report["frame_stats_cost"]:
        print(f"frame_stats cost: {report['frame_stats_cost']}")


if __name__ == "__main__":
    main()
