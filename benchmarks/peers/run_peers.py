"""Peers benchmark: anomalib's FastFlow against lineflow's engine, resnet18, 256 px, same run.

    benchmarks/peers/.venv-peers/bin/python benchmarks/peers/run_peers.py

anomalib's FastflowModel (random weights) is timed in PyTorch eager and through its ONNX export in OpenVINO
and ONNX Runtime; lineflow_side.py times lineflow in its own venv (a subprocess). fp32, 2 threads, batch 1
and 8, random (B, 3, 256, 256) float32 inputs. The two sides take turns for ROUNDS rounds (so drift on the
machine hits both); each row's number is the median of all its timed calls. Writes results.json, prints a table.
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


def anomalib_runners(onnx_path: Path) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = MapAndScore(FastflowModel(input_size=(256, 256), backbone="resnet18", pre_trained=False, flow_steps=8,
                                      conv3x3_only=False, hidden_ratio=1.0)).eval()
    torch.onnx.export(model, (torch.rand(2, 3, 256, 256),), str(onnx_path), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["anomaly_map", "pred_score"],
                      dynamic_axes={"images": {0: "batch"}})

    def eager(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # lineflow's FastFlow.forward runs under no_grad too
            return model(torch.from_numpy(x))

    compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "INFERENCE_NUM_THREADS": THREADS,
                                                              "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    runners = {"torch eager": eager,
               "openvino": lambda x: [np.array(v) for v in request.infer({0: x}).values()],
               "onnxruntime": lambda x: session.run(None, {"images": x})}
    # the exported graphs must compute what eager does (max |difference| of the anomaly maps)
    xs = np.random.default_rng(1).random((2, 3, 256, 256), dtype=np.float32)
    ref = eager(xs)[0].numpy()
    checks = {b: float(np.abs(np.asarray(runners[b](xs)[0]) - ref).max()) for b in ("openvino", "onnxruntime")}
    return runners, checks


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
        runners, checks = anomalib_runners(Path(tmp) / "fastflow.onnx")
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
               "rounds": ROUNDS, "anomalib_export_max_map_diff": checks, "rows": rows}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"anomalib export check, max |map diff| against its eager model: {checks}")
    print(table(rows))


if __name__ == "__main__":
    main()
