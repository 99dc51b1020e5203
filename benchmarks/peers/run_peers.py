"""Peers benchmark: anomalib's FastFlow against lineflow's engine, resnet18, 256 px, same run.

    benchmarks/peers/.venv-peers/bin/python benchmarks/peers/run_peers.py

anomalib's FastflowModel (random weights) is timed in PyTorch eager and through its ONNX export in OpenVINO
and ONNX Runtime; lineflow_side.py times lineflow in its own venv (a subprocess). 2 threads, batch 1 and 8,
random (B, 3, 256, 256) float32 inputs. The two sides take turns for ROUNDS rounds (so drift on the machine
hits both); each row's number is the median of all its timed calls. Writes results.json, prints a table.

anomalib's export runs two ways: as this benchmark first ran it (OpenVINO forced to f32, a dynamic batch
dimension) and at its best here: OpenVINO's own default precision (bf16 on CPUs that have it), a static
batch-1 graph with the latency hint for one frame and the throughput hint's streams for a batch (the
batch's frames as parallel requests, as lineflow's OpenVINO backend runs them); ONNX Runtime with a static
graph of the batch's size, and as before with a dynamic batch.
"""

import json
import statistics
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from anomalib.models.image.fastflow.torch_model import FastflowModel
from timing import time_calls

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
THREADS, BATCHES, ROUNDS = 2, (1, 8), 2


class MapAndScore(torch.nn.Module):
    """anomalib's eval forward returns an InferenceBatch with None fields; export its two tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out.anomaly_map, out.pred_score


def lineflow_side() -> dict:
    cmd = [str(REPO / ".venv/bin/python"), str(HERE / "lineflow_side.py")]
    done = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(model: torch.nn.Module, path: Path, batch: int | None) -> str:
    torch.onnx.export(model, (torch.rand(batch or 2, 3, 256, 256),), str(path), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["anomaly_map", "pred_score"],
                      dynamic_axes=None if batch else {"images": {0: "batch"}})
    return str(path)


def anomalib_runners(folder: Path) -> tuple[dict, dict, str]:
    """backend -> call(x) for anomalib's model: eager, and its export as before and at its best (module docstring);
    the exports' max |map difference| from eager; the precision OpenVINO picks by default on this CPU."""
    torch.manual_seed(0)
    model = MapAndScore(FastflowModel(input_size=(256, 256), backbone="resnet18", pre_trained=False, flow_steps=8,
                                      conv3x3_only=False, hidden_ratio=1.0)).eval()
    dynamic = _export(model, folder / "fastflow.onnx", None)
    static = {b: _export(model, folder / f"fastflow-b{b}.onnx", b) for b in BATCHES}

    def eager(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # lineflow's FastFlow.forward runs under no_grad too
            return model(torch.from_numpy(x))

    core = ov.Core()
    f32 = core.compile_model(dynamic, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS,
                                              "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    latency = core.compile_model(static[1], "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"})
    one = latency.create_infer_request()
    throughput = core.compile_model(static[1], "CPU", {"INFERENCE_NUM_THREADS": THREADS,
                                                       "PERFORMANCE_HINT": "THROUGHPUT"})
    queue = ov.AsyncInferQueue(throughput, throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    outputs: dict[int, list] = {}
    queue.set_callback(lambda request, i: outputs.__setitem__(i, [np.array(t.data) for t in request.output_tensors]))

    def openvino_best(x: np.ndarray) -> list[np.ndarray]:
        if len(x) == 1:
            return [np.array(v) for v in one.infer({0: x}).values()]
        for i in range(len(x)):  # a batch as parallel batch-1 requests on the throughput streams
            queue.start_async({0: x[i:i + 1]}, i)
        queue.wait_all()
        return [np.concatenate([outputs[i][k] for i in range(len(x))]) for k in range(2)]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    ort_dynamic = ort.InferenceSession(dynamic, opts, providers=["CPUExecutionProvider"])
    ort_static = {b: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for b, p in static.items()}
    runners = {"torch eager": eager,
               "openvino f32, dynamic batch (as first run)": lambda x: [np.array(v) for v in
                                                                       f32.infer({0: x}).values()],
               "openvino default precision, static, streams": openvino_best,
               "onnxruntime, dynamic batch (as first run)": lambda x: ort_dynamic.run(None, {"images": x}),
               "onnxruntime, static": lambda x: ort_static[len(x)].run(None, {"images": x})}
    # the exported graphs against eager (max |difference| of the anomaly maps; bf16 differs by its rounding)
    checks = {}
    for b in BATCHES:
        xs = np.random.default_rng(b).random((b, 3, 256, 256), dtype=np.float32)
        ref = eager(xs)[0].numpy()
        for name, run in runners.items():
            if name != "torch eager":
                checks[f"{name}, batch {b}"] = float(np.abs(np.asarray(run(xs)[0]) - ref).max())
    return runners, checks, str(latency.get_property("INFERENCE_PRECISION_HINT"))


def table(rows: list[dict]) -> str:
    best = {b: min(r["ms"] for r in rows if r["batch"] == b and r["implementation"] == "lineflow") for b in BATCHES}
    lines = ["| implementation | backend | batch | median ms | min-max ms | frames/s | ms / lineflow's fastest ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["implementation"], r["ms"])):
        lines.append(f"| {r['implementation']} | {r['backend']} | {r['batch']} | {r['ms']:.1f} | "
                     f"{min(r['calls_ms']):.0f}-{max(r['calls_ms']):.0f} | {r['frames_per_s']:.1f} | "
                     f"{r['ms'] / best[r['batch']]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(THREADS)
    calls: dict[tuple, list[list[float]]] = {}  # (implementation, backend, batch) -> one list of call times per round
    with tempfile.TemporaryDirectory() as tmp:
        runners, checks, ov_precision = anomalib_runners(Path(tmp))
        for _ in range(ROUNDS):
            lineflow = lineflow_side()
            for r in lineflow["rows"]:
                calls.setdefault((r["implementation"], r["backend"], r["batch"]), []).append(r["calls_ms"])
            for batch in BATCHES:
                x = np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)
                for backend, run in runners.items():
                    calls.setdefault(("anomalib", backend, batch), []).append(time_calls(run, x))
    rows = []
    for (impl, backend, batch), rounds in calls.items():
        flat = [t for r in rounds for t in r]
        ms = statistics.median(flat)
        rows.append({"implementation": impl, "backend": backend, "batch": batch, "ms": ms,
                     "frames_per_s": 1000 * batch / ms, "round_medians_ms": [statistics.median(r) for r in rounds],
                     "calls_ms": flat})
    versions = {p: version(p) for p in ("anomalib", "torch", "torchvision", "timm", "openvino", "onnxruntime", "onnx")}
    results = {"versions": {"anomalib_side": versions, "lineflow_side": lineflow["versions"]}, "threads": THREADS,
               "rounds": ROUNDS, "anomalib_export_max_map_diff": checks,
               "openvino_default_precision_here": ov_precision, "cpu": lineflow.get("cpu"), "rows": rows}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"anomalib export check, max |map diff| against its eager model: {checks}")
    print(f"OpenVINO's default inference precision on this CPU: {ov_precision}; CPU: {lineflow.get('cpu')}")
    print(table(rows))
    def best(batch: int, impl_prefix: str, exclude: str) -> dict:
        return min((r for r in rows if r["batch"] == batch and r["implementation"].startswith(impl_prefix)
                    and exclude not in r["backend"]), key=lambda r: r["ms"])
    for batch in BATCHES:
        peer = best(batch, "anomalib", "torch eager")
        same = best(batch, "lineflow", "default model")
        # `auto` builds the default model afresh each round and may keep a different precision each time
        default = sorted((r for r in rows if r["batch"] == batch and "default model" in r["backend"]),
                         key=lambda r: r["ms"])
        print(f"batch {batch}: anomalib at its best ({peer['backend']}) {peer['ms']:.1f} ms; lineflow resnet18 at "
              f"its best ({same['backend']}) {same['ms']:.1f} ms: {peer['ms'] / same['ms']:.2f}x"
              + (f"; lineflow's default model ({default[0]['backend']}) {default[0]['ms']:.1f} ms against anomalib's "
                 f"default FastFlow (the resnet18 one) at its best: {peer['ms'] / default[0]['ms']:.2f}x"
                 if default else ""))


if __name__ == "__main__":
    main()
