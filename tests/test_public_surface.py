"""The public surface, pinned: engine's public names, the signatures of engine.load, engine.run and Engine's
methods, Result's fields, the keys of the JSONL lines `python -m engine.run` writes, and every command's options.

Each expected value below is written out as it was when pinned. A change to any of them changes what users
call, read or type: make it on purpose and update the pin in the same change (the assertion's diff says what
moved).
"""

import argparse
import dataclasses
import importlib
import inspect
import json
import shutil

import pytest
from conftest import run_command

import engine

ALL = ["Engine", "EngineFileError", "Result", "StreamStats", "load", "run"]
LOAD = ["path", "threads=None", "busy_wait=True"]
RUN = ["engine_or_path", "source", "batch_size=1", "policy=None", "max_fps=None", "with_maps=True", "bgr=False",
       "queue_size=8", "stats=None", "frame_timeout=-1.0", "drift=None", "on_event=None", "camera=None"]
ENGINE_METHODS = {
    "__enter__": ["self"],
    "__exit__": ["self", "*exc"],
    "close": ["self"],
    "finish": ["self", "maps", "scores", "sizes", "with_maps=True"],
    "infer": ["self", "frames", "bgr=False"],
    "infer_prepared": ["self", "images"],
    "prepare": ["self", "frames", "bgr=False"],
    "prepare_tiles": ["self", "frames", "bgr=False"],
    "run_summary": ["self"],
    "score": ["self", "frames", "bgr=False", "with_maps=True"],
}
ENGINE_ATTRIBUTES = ["backend", "backend_name", "engine_id", "header", "input_size", "max_batch", "path", "precision",
                     "threshold", "tiling"]
RESULT_FIELDS = [("score", "<required>"), ("is_anomalous", "<required>"), ("anomaly_map", "None"), ("index", "0"),
                 ("source", "''"), ("timestamp", "None"), ("error", "None"), ("frame", "None"), ("bgr", "False"),
                 ("captured_perf", "0.0"), ("status", "<Status.OK: 'ok'>"), ("engine", "None"), ("threshold", "None"),
                 ("drift", "None"), ("device_timestamp", "None")]
STATUS = ["ok", "error", "dropped"]
JSONL_SCORED = ["index", "source", "timestamp", "score", "is_anomalous", "engine", "drift"]
JSONL_ERROR = ["index", "source", "timestamp", "error", "engine", "drift"]
OPTIONS = {
    "train.fit": [
        "--add-good", "--altub-every", "--backbone", "--backbone-weights", "--balance-sizes", "--base-lr",
        "--batch-size", "--blur-mode", "--blur-sigma", "--clamp", "--data", "--device", "--epoch-checkpoints",
        "--epochs", "--feature-pool", "--flow-steps", "--fusion", "--help", "--hidden-ratio", "--image-scales",
        "--image-score-top", "--input-size", "--lr", "--lr-schedule", "--map-scales", "--no-altub",
        "--no-early-stop", "--out", "--pool-scales", "--resume", "--seed", "--threshold-defects", "--threshold-rule",
        "--tile-overlap", "--tile-scale", "--train-precision", "--train-step", "-h"],
    "train.evaluate": ["--batch-size", "--data", "--device", "--help", "--image-score-top", "--json", "--protocol",
                       "-h", "model"],
    "train.demo_data": ["--help", "--overwrite", "--seed", "--size", "--test-defect", "--test-good", "--train", "-h",
                        "out"],
    "engine.build": ["--backend", "--batch", "--calib", "--help", "--out", "--precision", "-h", "-o", "model"],
    "engine.run": [
        "--batch", "--camera-name", "--camera-set", "--help", "--list-cameras", "--max-fps", "--metrics", "--mqtt",
        "--mqtt-ca", "--mqtt-client-id", "--mqtt-heartbeat", "--mqtt-password", "--mqtt-queue", "--mqtt-user",
        "--no-drift", "--opcua", "--opcua-cert", "--opcua-key", "--opcua-password", "--opcua-user", "--out",
        "--overlay-video", "--policy", "--quiet", "--reload", "--review", "--review-max-mb", "--review-sample",
        "--save-maps", "--server", "--server-send", "--source", "--threads", "--trigger", "--view", "--view-hold",
        "--view-token", "--webhook", "--webhook-all", "--webhook-queue", "--webhook-retries", "--webhook-timeout", "-h",
        "engine"],
    "engine.serve": ["--grpc-port", "--help", "--host", "--http-port", "--instances", "--max-batch",
                     "--max-queue-delay-us", "--metrics-port", "--no-dynamic-batching", "--reload", "--threads", "-h",
                     "engines"],
    "engine.demo": ["--backend", "--epochs", "--help", "--input-size", "--out", "-h"],
    "engine.tune": ["--defects", "--good", "--help", "--max-rejected", "--out", "--review", "-h", "-o", "engine"],
    "engine.review": ["--defect", "--good", "--help", "--list", "--who", "-h", "folder"],
}


def _params(fn) -> list[str]:
    """Each parameter as it reads in the signature, without its annotation: `name`, `name=default`, `*args`."""
    return [str(p.replace(annotation=inspect.Parameter.empty)) for p in inspect.signature(fn).parameters.values()]


def test_engine_api_names_and_signatures():
    assert sorted(engine.__all__) == ALL
    assert _params(engine.load) == LOAD
    assert _params(engine.run) == RUN
    methods = {name: _params(value) for name, value in vars(engine.Engine).items()
               if callable(value) and (not name.startswith("_") or name in ("__enter__", "__exit__"))}
    assert methods == ENGINE_METHODS


def test_result_fields_and_statuses():
    fields = dataclasses.fields(engine.Result)
    assert [(f.name, "<required>" if f.default is dataclasses.MISSING else repr(f.default)) for f in fields] \
        == RESULT_FIELDS
    assert [s.value for s in type(engine.Result(0.0, False).status)] == STATUS


def test_engine_run_writes_these_jsonl_keys_and_a_loaded_engine_these_attributes(tiny, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, path in enumerate(sorted(tiny["frames"].iterdir())[:2]):
        shutil.copy(path, frames / f"{i}.png")
    (frames / "2.png").write_bytes(b"not an image")  # an error line
    out = tmp_path / "r.jsonl"
    proc = run_command("engine.run", str(tiny["engine"]), "--source", str(frames), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(line) for line in lines] == [JSONL_SCORED, JSONL_SCORED, JSONL_ERROR]
    with engine.load(tiny["engine"]) as eng:
        assert sorted(name for name in vars(eng) if not name.startswith("_")) == ENGINE_ATTRIBUTES


class _Parsed(Exception):
    """Raised in place of parsing: the command's parser, caught before it reads any argument."""


@pytest.mark.parametrize("module", sorted(OPTIONS))
def test_command_options(module, monkeypatch):
    """Each command's parser, as its main() builds it: every option string and positional argument."""
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main([])
    got = sorted(s for action in parsers[0]._actions for s in (action.option_strings or [action.dest]))
    assert got == OPTIONS[module]
