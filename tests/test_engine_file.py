"""The engine file: its header one typed schema (broken, refused in one line), the previous format read as
the square model it is, and a loaded engine independent of its file."""

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import LEAN_BACKENDS

import engine
from engine.format import EngineFileError, read_engine, write_engine
from engine.header import EngineHeader


def test_engine_file_replaced_while_loaded(tiny, tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(tiny["engine"].read_bytes())
    frame = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with engine.load(path) as eng:
        before = eng.infer(frame).score
        path.write_bytes(b"garbage")  # overwritten in place
        assert eng.infer(frame).score == before  # the loaded engine is in memory, checked once
        path.unlink()
        assert eng.infer(frame).score == before
    with pytest.raises(engine.EngineFileError, match="not a lineflow engine file|no such file"):
        engine.load(path)


def _reseal_header(path: Path, out: Path, edit, version: int | None = None) -> None:
    """Copy an engine file with its JSON header edited (and, given, its format version), re-sealed."""
    blob = path.read_bytes()
    old_version, head_len = struct.unpack_from("<IQ", blob, 8)
    head = json.loads(blob[20:20 + head_len])
    edit(head)
    new_head = json.dumps(head).encode()
    body = (blob[:8] + struct.pack("<IQ", version or old_version, len(new_head)) + new_head
            + blob[20 + head_len:-32])
    out.write_bytes(body + hashlib.sha256(body).digest())


def _as_format_3(head: dict) -> None:
    """A square header as the builder of format 3 wrote it: sizes as ints, scoring's per-scale sides as heights."""
    head["format_version"] = 3
    assert head.pop("tiling") is None  # format 4 added it
    for key in ("tile_scale", "tile_overlap"):
        head["model_config"].pop(key)
    head["input_size"] = head["input_size"][0]
    head["model_config"]["input_size"] = head["model_config"]["input_size"][0]
    scoring = head["scoring"]
    scoring["size"] = scoring["size"][0]
    scoring["heights"] = [h for h, _ in scoring.pop("shapes")]


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
def test_engine_of_the_previous_format_loads_as_a_square_model(lean_engines, tmp_path):
    """Format 3 (before rectangular inputs) wrote input_size and scoring sizes as ints: such a file loads as
    the square model it is and scores the same."""
    old_keys = {"input_size", "threshold", "batch", "model_config", "model_threshold", "created", "built_on",
                "checks", "scoring", "backend", "precision", "format_version", "sections"}
    path = lean_engines[0]
    head = json.loads(path.read_bytes()[20:20 + struct.unpack_from("<Q", path.read_bytes(), 12)[0]])
    assert set(head) == old_keys | {"tiling", "input_stats", "provenance"} and head["input_size"] == [64, 64]
    old = tmp_path / "old.engine"
    _reseal_header(path, old, _as_format_3, version=3)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    loaded = engine.load(old)
    assert loaded.input_size == (64, 64) and loaded.header.scoring == engine.load(path).header.scoring
    assert np.array_equal(loaded.infer_prepared(x)[1], engine.load(path).infer_prepared(x)[1])


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
@pytest.mark.parametrize("edit,message", [
    (lambda h: h.update(tiling={"tile": 256}), "unknown keys"),
    (lambda h: h.update(input_size="64"), "input_size must be an integer or a"),
    (lambda h: h.update(input_size=[64, 64, 3]), "input_size must be an integer or a"),
    (lambda h: h.update(threshold=None), "threshold must be a finite number"),
    (lambda h: h.update(backend="tflite"), "unknown backend"),
    (lambda h: h.update(precision="bf16-flow"), "not one onnxruntime runs"),  # would look for two graphs
    (lambda h: h["scoring"].update(top_k=0), "top_k must be an integer"),
    (lambda h: h["scoring"].pop("shapes"), "scoring"),
    (lambda h: h.update(scoring=None), "needs its scoring"),
    (lambda h: h.pop("threshold"), "lacks threshold"),
])
def test_header_that_breaks_the_schema_is_refused_in_one_line(lean_engines, tmp_path, edit, message):
    assert lean_engines[0].stem == "onnxruntime" or "onnxruntime" not in message
    bad = tmp_path / "bad.engine"
    _reseal_header(lean_engines[0], bad, edit)
    with pytest.raises(EngineFileError, match=message) as info:
        engine.load(bad)
    assert str(bad) in str(info.value) and "rebuild" in str(info.value) and "\n" not in str(info.value)


def test_header_round_trips_and_is_never_mutated_by_writing(tmp_path):
    header = EngineHeader(backend="torch", input_size=64, threshold=1.5, checks={"a": 1})
    write_engine(tmp_path / "h.engine", header, {"model": b"model.pt"})
    read, sections = read_engine(tmp_path / "h.engine")
    assert read == header and sections == {"model": b"model.pt"}
    with pytest.raises(ValueError, match="precision"):
        replace(header, precision="int3")


def _peak_bytes(call) -> tuple[int, BaseException | None]:
    """(the peak of Python's and numpy's allocations during call(), what it raised)."""
    import tracemalloc
    tracemalloc.start()
    try:
        call()
        raised = None
    except BaseException as e:  # noqa: BLE001 - returned to the test
        raised = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


MiB = 2**20


@pytest.mark.parametrize("edit,message", [
    (lambda h: (h.update(input_size=[9000, 9000]), h["scoring"].update(size=[9000, 9000])), "input_size"),
    (lambda h: h.update(batch=2000), "batch"),
    (lambda h: h["scoring"].update(shapes=[[100000, 16]] * len(h["scoring"]["shapes"])), "scoring.shapes"),
    (lambda h: h["scoring"].update(size=[4096, 4096]), "scoring.size"),
])
def test_a_header_declaring_huge_sizes_is_refused_before_allocating(tiny, tmp_path, edit, message):
    """Sizes the load would allocate from (the input, a fixed batch the self-test pads to, the scoring's maps) are
    bounded by the header's schema (engine.header): refused in one line before the backend or the self-test
    allocates anything of that size."""
    bad = tmp_path / "huge.engine"
    _reseal_header(tiny["engine"], bad, edit)
    size = bad.stat().st_size
    peak, raised = _peak_bytes(lambda: engine.load(bad))
    assert isinstance(raised, EngineFileError) and message in str(raised) and "\n" not in str(raised), raised
    assert peak < size + 16 * MiB, f"{peak / MiB:.0f} MiB allocated for a {size / MiB:.0f} MiB file"


def test_a_tiling_engine_self_tests_on_one_tile(tiny, tmp_path):
    """A tiling header at its extremes (scale 16, overlap 0.75: thousands of tiles for a frame of the input's size)
    loads with a self-test of a frame that makes one tile, not thousands."""
    tiled = tmp_path / "tiled.engine"
    _reseal_header(tiny["engine"], tiled, lambda h: h.update(tiling={"scale": 16, "overlap": 0.75,
                                                                      "top_fraction": 0.01}))
    size = tiled.stat().st_size
    peak, raised = _peak_bytes(lambda: engine.load(tiled).close())
    assert raised is None, raised
    assert peak < size + 16 * MiB, f"{peak / MiB:.0f} MiB allocated for a {size / MiB:.0f} MiB file"


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["sections"][0].update(length=2**40), "beyond the end of the file"),
    (lambda h: h["sections"][0].update(offset=2**62), "beyond the end of the file"),
])
def test_a_section_beyond_the_file_is_refused_by_its_declared_size(tiny, tmp_path, edit, message):
    bad = tmp_path / "bad.engine"
    _reseal_header(tiny["engine"], bad, edit)
    with pytest.raises(EngineFileError, match=message) as info:
        read_engine(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_a_header_length_beyond_the_file_is_refused(tiny, tmp_path):
    blob = bytearray(tiny["engine"].read_bytes())
    struct.pack_into("<Q", blob, 12, 2**40)
    blob[-32:] = hashlib.sha256(bytes(blob[:-32])).digest()
    bad = tmp_path / "bad.engine"
    bad.write_bytes(bytes(blob))
    with pytest.raises(EngineFileError, match="header of 1099511627776 bytes, beyond the end of the file"):
        read_engine(bad)


def test_reading_an_engine_file_holds_its_sections_once(tmp_path):
    """The file is not read whole and copied: the sections are the one copy in memory (a 32 MiB file, read in
    well under 2 x 32 MiB)."""
    header = EngineHeader(backend="torch", input_size=64, threshold=1.5)
    path = tmp_path / "big.engine"
    write_engine(path, header, {"model": bytes(32 * MiB)})
    peak, raised = _peak_bytes(lambda: read_engine(path))
    assert raised is None, raised
    assert peak < 40 * MiB, f"{peak / MiB:.0f} MiB allocated to read a 32 MiB file"


def test_an_engine_path_that_is_not_a_regular_file_is_refused_unread(tmp_path):
    """/dev/zero (an endless stream) is refused by its kind, not read until memory runs out (the child process
    is capped at 1 GiB, so the old whole-file read failed there with MemoryError)."""
    import subprocess
    import sys
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
            "from engine.format import EngineFileError, read_engine\n"
            "try:\n    read_engine('/dev/zero')\nexcept EngineFileError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "/dev/zero: not a regular file" in proc.stdout, proc.stderr[-500:]
