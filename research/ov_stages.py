"""Where an OpenVINO engine's frame goes, node by node, and what its flow gains from running scales side by side.

    python research/ov_stages.py nodes ENGINE [--calls 30]
    python research/ov_stages.py parallel-flow ENGINE [--calls 100]

nodes: each ONNX section of ENGINE compiled as engine.backends.ov compiles it (batch 1, latency hint, all
threads, the section's precision), OpenVINO's per-node counters summed over the last call of `--calls` on
random inputs: time per node type, and per convolution shape (kernel, input channels, height), with the
time per node. parallel-flow (a bf16-flow engine): its flow section as one graph on all threads, against
its scales cut out of it (`ov.Model` on each scale's parameter and result) and compiled for one unpinned
thread each, in two groups run at once (scale 0 against the rest, by start_async), call by call in turns.
"""
import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.backends import default_threads  # noqa: E402
from engine.backends.ov import compile_config  # noqa: E402
from engine.format import read_engine  # noqa: E402
from engine.header import SECTION_ONNX_FLOW, STAGE_PRECISIONS, required_sections  # noqa: E402

core = ov.Core()


def read(onnx: bytes):
    model = core.read_model(onnx, b"")
    model.reshape({i.get_any_name(): ov.PartialShape([1, *list(i.get_partial_shape())[1:]]) for i in model.inputs})
    return model


def compiled(model, precision: str, threads: int, **extra):
    return core.compile_model(model, "CPU", compile_config(threads, precision, **extra))


def inputs_of(model) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(tuple(i.get_shape()), dtype=np.float32) for i in model.inputs]


def nodes(header, sections, calls: int) -> None:
    stages = STAGE_PRECISIONS.get(header.precision,
                                  [(name, header.precision) for name in required_sections(header.backend,
                                                                                          header.precision)])
    for name, precision in stages:
        model = read(sections[name])
        graph = compiled(model, precision, default_threads(None), PERF_COUNT=True)
        shapes = {}
        for op in graph.get_runtime_model().get_ops():
            dims = [tuple(op.get_input_partial_shape(i).to_shape()) for i in range(op.get_input_size())
                    if op.get_input_partial_shape(i).is_static]
            shapes[op.get_friendly_name()] = dims
        request, x = graph.create_infer_request(), inputs_of(model)
        for _ in range(calls):
            request.infer(x)
        by_type, by_conv = collections.defaultdict(list), collections.defaultdict(list)
        for p in request.profiling_info:
            ms = p.real_time.total_seconds() * 1e3
            if ms == 0:
                continue
            by_type[f"{p.node_type} ({p.exec_type})"].append(ms)
            dims = shapes.get(p.node_name, [])
            if p.node_type in ("Convolution", "GroupConvolution") and len(dims) > 1:
                by_conv[f"{p.node_type} {dims[1][-1]}x{dims[1][-1]} on {dims[0][1]} ch x {dims[0][2]} px"].append(ms)
        total, count = sum(sum(v) for v in by_type.values()), sum(map(len, by_type.values()))
        print(f"\n{name} ({precision}, {default_threads(None)} threads): {total:.2f} ms in {count} timed nodes")
        for key, v in sorted(by_type.items(), key=lambda kv: -sum(kv[1]))[:12]:
            print(f"  {key:50s} {len(v):4d} nodes {sum(v):7.2f} ms  {1e3 * sum(v) / len(v):6.1f} us each")
        for key, v in sorted(by_conv.items(), key=lambda kv: -sum(kv[1]))[:12]:
            print(f"  {key:50s} {len(v):4d} nodes {sum(v):7.2f} ms  {1e3 * sum(v) / len(v):6.1f} us each")


def parallel_flow(header, sections, calls: int) -> None:
    if header.precision != "bf16-flow":
        sys.exit(f"{header.precision} engines have no flow section of their own; build one with --precision bf16-flow")
    section, precision = STAGE_PRECISIONS[header.precision][1]
    assert section == SECTION_ONNX_FLOW
    model = read(sections[section])
    x = inputs_of(model)
    whole = compiled(model, precision, default_threads(None)).create_infer_request()
    params, results = model.get_parameters(), model.get_results()
    groups = [[0], list(range(1, len(params)))]
    parts = [compiled(ov.Model([results[i] for i in g], [params[i] for i in g], f"flow{g}"), precision, 1,
                      ENABLE_CPU_PINNING=False).create_infer_request() for g in groups]

    def side_by_side():
        for request, g in zip(parts[1:], groups[1:]):
            request.start_async([x[i] for i in g])
        parts[0].infer([x[i] for i in groups[0]])
        for request in parts[1:]:
            request.wait()
    runs = {"one graph, all threads": lambda: whole.infer(x), "scale 0 | the rest, 1 thread each": side_by_side}
    for run in runs.values():
        run()
    times = {k: [] for k in runs}
    for _ in range(calls):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append((time.perf_counter() - t0) * 1e3)
    first = next(iter(times.values()))
    for k, v in times.items():
        ratio = statistics.median(a / b for a, b in zip(first, v))
        print(f"{k:36s} median {statistics.median(v):6.2f} ms  paired ratio (first / this) {ratio:.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("nodes", "parallel-flow"))
    p.add_argument("engine")
    p.add_argument("--calls", type=int, default=None)
    a = p.parse_args()
    h, s = read_engine(a.engine)
    if h.backend != "openvino":
        sys.exit(f"{a.engine}: a {h.backend} engine; this script reads OpenVINO ones")
    (nodes if a.mode == "nodes" else parallel_flow)(h, s, a.calls or (30 if a.mode == "nodes" else 100))
