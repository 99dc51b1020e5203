"""python -m engine.serve model.engine [more.engine ...]: serve engines on NVIDIA Triton Inference Server.

Through PyTriton (the nvidia-pytriton wheel ships the real `tritonserver` and its Python backend): each
engine becomes a Triton model named after its file's stem, with dynamic batching feeding the engine's
batched path and the engine's own backend inside. Clients are the standard `tritonclient` (HTTP, gRPC);
health, readiness and Prometheus metrics are Triton's own.

    input   frames        UINT8 [batch, H, W, 3]  RGB, any H and W (frames of one request share a size)
    output  score         FP32  [batch, 1]
            is_anomalous  BOOL  [batch, 1]
            anomaly_map   FP32  [batch, H, W]     only computed when a client asks for it
            engine_info   BYTES [batch, 1]        the facts of the engine that scored the frame, as JSON
                                                  (engine_id, threshold, input size, tiling, backend): what
                                                  a thin client (engine.remote) needs; and "error", why a
                                                  frame has no score (its score is then NaN and is_anomalous
                                                  true, so a client that reads only the verdict rejects the
                                                  part rather than pass it; engine.remote makes it an error
                                                  result)

Triton's Python backend needs the system's Python 3.11: run this from `.venv-serve` (made by
`bash venv-serve.sh`; docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
from pathlib import Path

import numpy as np

from engine.common.cli import HelpFormatter
from engine.common.errors import UserError, run_cli
from engine.remote import ENGINE_INFO

__all__ = ["main", "model_name", "SERVE_INPUT", "SERVE_OUTPUTS"]

SERVE_INPUT = "frames"
SERVE_OUTPUTS = ("score", "is_anomalous", "anomaly_map", ENGINE_INFO)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def model_name(path: str | Path) -> str:
    """The Triton model name of an engine file: its stem (letters, digits, '.', '_' and '-' only)."""
    stem = Path(path).stem
    if not _NAME.fullmatch(stem):
        raise UserError(f"{path}: the model name would be {stem!r}; Triton takes letters, digits, '.', '_' and '-': "
                        "rename the file")
    return stem


def _check_port(host: str, port: int, option: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"{option} {port}: cannot listen on {host}:{port} ({e.strerror})") from None


def _engine_info(eng, result) -> bytes:
    """The facts of the engine that scored `result`, as JSON (what engine.remote needs): its id and threshold
    change when the engine is swapped (--reload); input size and tiling cannot (a swap that changes them is
    refused). A frame without a score carries its error."""
    from dataclasses import asdict
    facts = {"threshold": result.threshold if result.threshold is not None else eng.threshold,
             "engine_id": result.engine or eng.engine_id, "input_size": list(eng.input_size),
             "backend": eng.backend_name, "precision": eng.precision,
             "tiling": None if eng.tiling is None else asdict(eng.tiling)}
    if result.error is not None:
        facts["error"] = result.error
    return json.dumps(facts, allow_nan=False).encode()


def _outputs(eng, part: list, wanted, infos: dict[tuple, bytes]) -> dict[str, np.ndarray]:
    """One request's outputs for its frames' Results. A Result without a score (an error) goes out as score NaN,
    is_anomalous true (never a pass, even to a client that reads nothing else) and its error in engine_info."""
    n = len(part)
    out = {"score": np.array([[np.nan if r.score is None else r.score] for r in part], np.float32).reshape(n, 1),
           "is_anomalous": np.array([[r.score is None or bool(r.is_anomalous)] for r in part], np.bool_).reshape(n, 1)}
    if wanted is None or "anomaly_map" in wanted:
        out["anomaly_map"] = np.stack([r.anomaly_map for r in part]).astype(np.float32)
    if wanted is None or ENGINE_INFO in wanted:
        keys = [(r.engine, r.threshold, r.error) for r in part]
        for key, r in zip(keys, part):
            if key not in infos:
                if len(infos) > 64:  # errors vary: keep the cache small
                    infos.clear()
                infos[key] = _engine_info(eng, r)
        out[ENGINE_INFO] = np.array([[infos[key]] for key in keys], dtype=np.object_)
    return out


def _infer_function(eng):
    """The PyTriton callable of one model instance: every request of a dynamic batch through one engine call."""
    from pytriton.exceptions import PyTritonBadParameterError
    infos: dict[tuple, bytes] = {}

    def infer(requests):
        frames, counts = [], []
        for request in requests:
            x = request[SERVE_INPUT]
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or 0 in x.shape[1:3]:
                raise PyTritonBadParameterError(f"{SERVE_INPUT} must be UINT8 [batch, H, W, 3] with H, W > 0; got "
                                                f"{x.dtype} {list(x.shape)}")
            frames.extend(x)
            counts.append(len(x))
        results = eng.infer(frames) if frames else []
        responses, i = [], 0
        for request, n in zip(requests, counts):
            part, i = results[i:i + n], i + n
            responses.append(_outputs(eng, part, getattr(request, "requested_output_names", None), infos))
        return responses
    return infer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="exit status: 0 stopped (Ctrl-C or SIGTERM ends the server and its "
                                "tritonserver); 2 bad engine or option; 1 the server failed")
    p.add_argument("engines", nargs="+", metavar="ENGINE", help="engine files written by python -m engine.build; "
                   "each is served as the model named after its file's stem")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP, gRPC and metrics endpoints bind "
                   "(Triton's own default would be every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--instances", type=int, default=1, help="model instances per engine (each its own engine "
                   "and backend threads; requests run on them in parallel)")
    p.add_argument("--max-batch", type=int, default=16, help="frames per batch Triton's dynamic batcher forms "
                   "at most (and per request)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="how long a request may wait for others "
                   "to batch with, in microseconds")
    p.add_argument("--no-dynamic-batching", action="store_true", help="each request on its own (Triton's default "
                   "scheduler), for comparison")
    p.add_argument("--threads", type=int, help="backend threads per instance (default: all cores / instances)")
    p.add_argument("--reload", action="store_true", help="follow each engine file as engine.run --reload does: a "
                   "new file at the same path (renamed over it) is swapped in between batches, at once on SIGHUP; "
                   "clients see the new engine's id and threshold in engine_info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.instances < 1 or args.max_batch < 1 or args.max_queue_delay_us < 0:
        raise UserError("--instances and --max-batch must be at least 1, --max-queue-delay-us at least 0")
    names = [model_name(p) for p in args.engines]
    if len(set(names)) != len(names):
        raise UserError(f"two engines would have the same model name ({', '.join(names)}): rename one file")
    for opt, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                      ("--metrics-port", args.metrics_port)):
        _check_port(args.host, port, opt)
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise UserError(f"engine.serve needs nvidia-pytriton ({e}): make the serving environment with "
                        "`bash venv-serve.sh` and run `.venv-serve/bin/python -m engine.serve` (docs/deploy.md)") \
            from None
    import engine
    from engine.backends import default_threads
    threads = args.threads or max(1, default_threads(None) // args.instances)
    # several engines in this process: their runtimes must not spin between calls (each slows the others)
    busy_wait = len(args.engines) * args.instances == 1
    if args.reload:
        from engine.reload import ReloadingEngine

        def load(path):
            return ReloadingEngine(path, threads, busy_wait, on_event=lambda line: print(line, file=sys.stderr,
                                                                                         flush=True))
    else:
        def load(path):
            return engine.load(path, threads, busy_wait)
    loaded = {name: [load(path) for _ in range(args.instances)]
              for name, path in zip(names, args.engines)}  # a bad engine fails here, in one line
    if args.reload and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: [e.reload_now() for es in loaded.values() for e in es])
    config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port,
                          exit_on_error=True, log_verbose=0)
    try:
        with Triton(config=config) as triton:
            for name, engines in loaded.items():
                triton.bind(
                    model_name=name, infer_func=[_infer_function(e) for e in engines],
                    inputs=[Tensor(name=SERVE_INPUT, dtype=np.uint8, shape=(-1, -1, 3))],
                    outputs=[Tensor(name="score", dtype=np.float32, shape=(1,)),
                             Tensor(name="is_anomalous", dtype=np.bool_, shape=(1,)),
                             Tensor(name="anomaly_map", dtype=np.float32, shape=(-1, -1)),
                             Tensor(name=ENGINE_INFO, dtype=np.bytes_, shape=(1,))],
                    config=ModelConfig(max_batch_size=args.max_batch, batcher=None if args.no_dynamic_batching else
                                       DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)))
                first = engines[0]
                print(f"serving {name}: {first.backend_name} {first.precision}, input {first.input_size[1]}x"
                      f"{first.input_size[0]}, threshold {first.threshold:.4f}, {args.instances} instance(s)"
                      + ("" if busy_wait else ", threads sleep between calls (engines share the process)"),
                      file=sys.stderr, flush=True)
            print(f"Triton: http://{args.host}:{args.http_port} grpc://{args.host}:{args.grpc_port} metrics "
                  f"http://{args.host}:{args.metrics_port}/metrics; Ctrl-C stops", file=sys.stderr, flush=True)
            triton.serve()
    finally:
        for engines in loaded.values():
            for e in engines:
                e.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
