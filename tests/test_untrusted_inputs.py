"""Untrusted inputs: fuzzed image files, frames and engine files; engine files from a newer lineflow, carrying
code, or built for a backend missing here.

Each fuzz test draws FUZZ_EXAMPLES inputs (10,000 by default; LINEFLOW_FUZZ_EXAMPLES overrides) and
accepts exactly two outcomes: a valid result, or the one exception type that carries a clear message
(DataError for image files, ValueError / TypeError for frames, EngineFileError for engine files).
Any other exception, a crash or a non-finite output fails the test.
"""

import hashlib
import io
import os
import struct
import tempfile
from dataclasses import replace

import numpy as np
import pytest
from conftest import CodePickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.common.images import DataError, read_image
from engine.format import EngineFileError, read_engine, write_engine
from engine.header import EngineHeader, ScoringSpec
from engine.runtime import Engine

FUZZ_EXAMPLES = int(os.environ.get("LINEFLOW_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encoded(fmt: str, mode: str, size=(9, 7)) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, size=size[::-1], dtype=np.uint16))
    else:
        bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
        im = Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [(".png", _encoded("PNG", "RGB")), (".png", _encoded("PNG", "I;16")), (".png", _encoded("PNG", "RGBA")),
         (".jpg", _encoded("JPEG", "RGB")), (".bmp", _encoded("BMP", "L")), (".tif", _encoded("TIFF", "RGB")),
         (".webp", _encoded("WEBP", "RGB"))]


@st.composite
def mutated_image(draw):
    suffix, data = draw(st.sampled_from(SEEDS))
    data = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "random", "header"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        data = bytearray(draw(st.binary(min_size=0, max_size=512)))
    else:  # a header claiming a huge or odd size (PNG IHDR width/height), the rest intact
        if suffix == ".png":
            data[16:24] = struct.pack(">II", draw(st.sampled_from([0, 1, 20000, 2**31 - 1])),
                                      draw(st.sampled_from([0, 1, 20000, 2**31 - 1])))
    return suffix, bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # Pillow's notes on broken files
def test_fuzz_image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes = {"read": 0, "refused": 0}

    @FUZZ
    @given(mutated_image())
    def check(case):
        suffix, data = case
        path = folder / f"case{suffix}"
        path.write_bytes(data)
        try:
            a = read_image(path)
        except DataError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            return
        assert a.dtype == np.float32 and a.ndim == 3 and a.shape[2] == 3 and np.isfinite(a).all()
        assert a.min() >= 0 and a.max() <= 1
        outcomes["read"] += 1

    check()
    print(f"image files fuzzed: {outcomes}")
    assert sum(outcomes.values()) >= min(FUZZ_EXAMPLES, 10000) and outcomes["refused"] > 0, outcomes


def test_huge_header_is_refused_before_decoding(tmp_path):
    data = bytearray(_encoded("PNG", "RGB"))
    data[16:24] = struct.pack(">II", 20000, 20000)  # 400 megapixels claimed by a tiny file
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bomb.png.*(limit|cannot read)"):
        read_image(path)


frames = st.one_of(
    st.builds(lambda shape, dtype, seed: np.random.default_rng(seed).integers(0, 255, size=shape).astype(dtype),
              st.lists(st.integers(0, 12), min_size=0, max_size=4).map(tuple),
              st.sampled_from([np.uint8, np.uint16, np.int32, np.int8, np.bool_]), st.integers(0, 99)),
    st.builds(lambda shape, fill, seed: np.where(np.random.default_rng(seed).random(shape) < 0.3, fill,
                                                 np.random.default_rng(seed).random(shape)).astype(np.float32),
              st.lists(st.integers(1, 12), min_size=2, max_size=3).map(tuple),
              st.sampled_from([np.nan, np.inf, -np.inf, 0.5, 7.0, -3.0]), st.integers(0, 99)),
)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fuzz_frames_through_preprocessing():
    """Any array -> model input or a ValueError / TypeError saying what is wrong with the frame."""
    eng = Engine.__new__(Engine)
    eng.input_size = (32, 48)  # (H, W): a rectangle, so a swapped axis shows
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(frames, st.booleans())
    def check(frame, bgr):
        try:
            x, sizes = eng.prepare([frame], bgr=bgr)
        except (ValueError, TypeError) as e:
            assert str(e)
            outcomes["refused"] += 1
            return
        assert x.shape == (1, 3, 32, 48) and np.isfinite(x).all() and sizes == [frame.shape[:2]]
        outcomes["ok"] += 1

    check()
    print(f"frames fuzzed: {outcomes}")
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes


SEED_ENGINE = os.path.join(tempfile.gettempdir(), f"lineflow-fuzz-seed-{os.getpid()}.engine")
HEADER = EngineHeader(input_size=64, threshold=1.0, backend="onnxruntime", precision="fp32",
                      scoring=ScoringSpec(size=(64, 64), sigma=4.0, top_k=1, shapes=((16, 16),), map_weights=(1.0,),
                                          image_weights=(1.0,)))


@st.composite
def mutated_engine(draw):
    body = draw(st.binary(min_size=0, max_size=256))
    path = SEED_ENGINE
    write_engine(path, replace(HEADER, created=draw(st.text(max_size=20))), {"onnx": body})
    data = bytearray(open(path, "rb").read())
    kind = draw(st.sampled_from(["flip", "truncate", "append", "header", "resum"]))
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "header":  # a version or header length that lies
        struct.pack_into("<IQ", data, 8, draw(st.integers(0, 5)), draw(st.integers(0, 2**40)))
    else:  # damage the JSON header or section table, then fix the file checksum: the parser must cope
        head_len = struct.unpack_from("<Q", data, 12)[0]
        i = 20 + draw(st.integers(0, head_len - 1))
        data[i] = draw(st.integers(0, 255))
        data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    return bytes(data)


def test_fuzz_engine_loader(tmp_path):
    path = tmp_path / "fuzzed.engine"
    outcomes = {"read": 0, "refused": 0}

    @FUZZ
    @given(mutated_engine())
    def check(data):
        path.write_bytes(data)
        try:
            header, sections = read_engine(path)
        except EngineFileError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            return
        assert isinstance(header, EngineHeader) and isinstance(sections, dict)
        outcomes["read"] += 1

    check()
    print(f"engine files fuzzed: {outcomes}")
    assert outcomes["refused"] > 0, outcomes


def test_future_engine_version_says_upgrade(tmp_path):
    path = tmp_path / "future.engine"
    write_engine(path, HEADER, {"onnx": b"x"})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="newer lineflow.*upgrade"):
        read_engine(path)


def test_engine_with_a_code_pickle_is_refused_without_running_it(tmp_path):
    """A torch-backend engine whose model section is a pickle that would create a file."""
    import pickle

    import engine
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.engine"
    write_engine(path, replace(HEADER, backend="torch", scoring=None),  # no kernels section to read first
                 {"model": pickle.dumps({"x": CodePickle(str(marker))})})
    with pytest.raises(Exception, match="refused|not a lineflow model|cannot read") as info:
        engine.load(path)
    assert type(info.value).__name__ in ("ModelFileError", "EngineFileError"), info.value
    assert not marker.exists()


def test_engine_for_a_backend_missing_here_says_what_to_do(tmp_path):
    import engine
    path = tmp_path / "trt.engine"
    write_engine(path, replace(HEADER, backend="tensorrt"), {"tensorrt_plan": b"plan"})
    with pytest.raises(EngineFileError, match="built for tensorrt, which is not installed here.*rebuild with"):
        engine.load(path)
