"""The engine file: one self-checking container for a compiled model and everything needed to run it.

    b"LFENGINE" | u32 format version | u64 header length | header (JSON) | sections... | SHA-256 of all before

The header (engine/header.py, one typed schema) carries the model's settings (input size, threshold,
precision and the build's own accuracy checks) and a table naming each section (ONNX graph,
serialised TensorRT plan, ...) with its offset, length and SHA-256. Nothing in it is executable:
sections are bytes handed to a backend's parser, and the header is plain JSON. Standard library
only: the run side stays lean.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

from engine.common.errors import UserError
from engine.common.files import atomic_write
from engine.header import EngineHeader

__all__ = ["MAGIC", "FORMAT_VERSION", "OLDEST_READABLE", "MAX_HEADER_BYTES", "EngineFileError", "write_engine",
           "read_engine", "read_engine_file", "engine_id", "ENGINE_ID_DIGITS",
           "upgrade_header"]

MAGIC = b"LFENGINE"
# The versions, and what each changed in the header (upgrade_header walks a file of any readable version up to the
# current one, step by step; the schema classes in engine/header.py and engine/scoring.py read the current form only):
#   1 (2026-11-25) every backend's graph ends at the image score; no scoring. Not readable: rebuild.
#   2 (2026-11-25) CPU engines end at the per-scale maps, fused natively by header.scoring {size: int, sigma: one
#     number, top_k, heights: a side a scale, map_weights, image_weights}; torch and TensorRT engines carry none
#   3 (2026-11-25) precision bf16-flow (sections onnx_backbone, onnx_flow); the header unchanged
#   4 (2026-12-02) rectangular inputs: input_size and scoring.size [height, width], scoring.shapes [[h, w], ...]
#     for heights; tiling. Later under the same number, TensorRT plans end at the per-scale maps with a scoring
#     (a TensorRT engine without one is refused: rebuild)
#   5 (2026-12-02) precisions int8 and int8-backbone (NNCF's quantize/dequantize pairs in the onnx section)
#   6 (2026-12-03) scoring.sigma a list, one a scale
#   7 (2026-12-05) precision bf16-deep (sections onnx_head, onnx_tail); the header unchanged
#   8 (2026-12-06) torch engines carry the kernels section (the CUDA path's folded flow) and a scoring; a torch
#     engine of 2-7 has neither and runs as the PyTorch reference on a CPU only
#   9 (2026-12-06) input_stats (the training frames' statistics: drift alarms) and provenance (engine.tune's
#     record of a retuned threshold); an older file has neither (None)
FORMAT_VERSION = 9
OLDEST_READABLE = 2
_FIXED = struct.Struct("<8sIQ")  # magic, version, header length
MAX_HEADER_BYTES = 1 << 20  # a header's JSON at most (a built one is a few kB): refused unread above it
_CHUNK = 1 << 20  # the file is hashed this many bytes at a time
ENGINE_ID_DIGITS = 12


def _square(v):
    """An int N of the files before rectangles -> [N, N]; anything else as it is (the schema checks it)."""
    return [v, v] if isinstance(v, int) and not isinstance(v, bool) else v


def _to_3(raw: dict) -> dict:
    return raw


def _to_4(raw: dict) -> dict:
    scoring = raw.get("scoring")
    if isinstance(scoring, dict):
        scoring = {**scoring, "size": _square(scoring.get("size"))}
        if "heights" in scoring:
            heights = scoring.pop("heights")
            scoring["shapes"] = [[h, h] for h in heights] if isinstance(heights, list) else heights
    return {**raw, "input_size": _square(raw.get("input_size")), "scoring": scoring, "tiling": raw.get("tiling")}


def _to_5(raw: dict) -> dict:
    if raw.get("backend") == "tensorrt" and raw.get("scoring") is None:
        raise ValueError("its TensorRT plan ends at the image score (built before plans ended at the per-scale maps, "
                         "which TensorRT builds for every model)")
    return raw


def _to_6(raw: dict) -> dict:
    scoring = raw.get("scoring")
    if isinstance(scoring, dict) and not isinstance(scoring.get("sigma"), list):
        shapes = scoring.get("shapes")
        scoring = {**scoring, "sigma": [scoring.get("sigma")] * (len(shapes) if isinstance(shapes, list) else 1)}
    return {**raw, "scoring": scoring}


def _to_7(raw: dict) -> dict:
    return raw


def _to_8(raw: dict) -> dict:
    return raw  # a torch engine keeps its scoring None: no kernels section, the CPU reference only


def _to_9(raw: dict) -> dict:
    return raw  # input_stats and provenance default to None


# version -> the step to the next one
_UPGRADES = {2: _to_3, 3: _to_4, 4: _to_5, 5: _to_6, 6: _to_7, 7: _to_8, 8: _to_9}
assert set(_UPGRADES) == set(range(OLDEST_READABLE, FORMAT_VERSION))


def upgrade_header(raw: dict, version: int) -> dict:
    """A header's JSON object as a file of `version` wrote it (without format_version and sections) -> the current
    schema, one step a version. ValueError for a version outside OLDEST_READABLE..FORMAT_VERSION or a header that
    no step can bring up (the reader makes it one line naming the file)."""
    if not OLDEST_READABLE <= version <= FORMAT_VERSION:
        raise ValueError(f"engine format version {version} is outside {OLDEST_READABLE}-{FORMAT_VERSION}")
    for v in range(version, FORMAT_VERSION):
        raw = _UPGRADES[v](raw)
    return raw


class EngineFileError(UserError):
    """The engine file is missing, damaged, from another format version or not an engine file."""


def write_engine(path: str | Path, header: EngineHeader, sections: dict[str, bytes]) -> None:
    """Write atomically (engine.common.files): never a partial engine."""
    offset, table = 0, []
    for name, data in sections.items():
        table.append({"name": name, "offset": offset, "length": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        offset += len(data)
    head = json.dumps({**header.to_dict(), "format_version": FORMAT_VERSION, "sections": table},
                      sort_keys=True).encode()
    digest = hashlib.sha256()
    with atomic_write(path) as f:
        for chunk in (_FIXED.pack(MAGIC, FORMAT_VERSION, len(head)), head, *sections.values()):
            f.write(chunk)
            digest.update(chunk)
        f.write(digest.digest())


def read_engine(path: str | Path) -> tuple[EngineHeader, dict[str, bytes]]:
    """-> (header, sections), every checksum verified; EngineFileError names the file and the problem."""
    header, sections, _ = read_engine_file(path)
    return header, sections


def engine_id(blob: bytes) -> str:
    """An engine's id: the first ENGINE_ID_DIGITS hex digits of its file's SHA-256, as `sha256sum` prints it."""
    return hashlib.sha256(blob).hexdigest()[:ENGINE_ID_DIGITS]


def _open_regular(path: Path):
    """The file opened for reading, once it is known to be a regular file (a FIFO would block the open, /dev/zero
    would never end); its size."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise EngineFileError(f"{path}: is a folder, not an engine file")
        if not stat.S_ISREG(st.st_mode):
            raise EngineFileError(f"{path}: not a regular file (a device, pipe or socket), not an engine file")
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller's with
    except FileNotFoundError:
        raise EngineFileError(f"{path}: no such file") from None
    except OSError as e:
        raise EngineFileError(f"{path}: cannot read ({e.strerror})") from None
    return f, os.fstat(f.fileno()).st_size


def _hash_through(f, digest, n: int) -> None:
    """Read n bytes of f into digest, a chunk at a time (never the whole file in memory); stops early at its end."""
    buf = memoryview(bytearray(min(max(n, 0), _CHUNK)))
    while n > 0:
        got = f.readinto(buf[:min(n, _CHUNK)])
        if not got:
            return
        digest.update(buf[:got])
        n -= got


def _section_plan(head: bytes, body_start: int, body_end: int) -> tuple[dict | None, list, str | None]:
    """The header's JSON (without its table) and its sections as (name, start, length, sha256) in file order, each
    checked to lie inside the file and apart from the others before a byte of it is read; or a problem."""
    try:
        raw = json.loads(head)
    except (ValueError, RecursionError) as e:
        return None, [], f"malformed engine header ({str(e)[:200] or type(e).__name__})"
    if not isinstance(raw, dict) or not isinstance(raw.get("sections"), list):
        return None, [], "engine header lacks a section table"
    table = []
    for s in raw.pop("sections"):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("sha256"), str)
                and all(type(s.get(k)) is int and s[k] >= 0 for k in ("offset", "length"))):
            return None, [], "malformed section table"
        start = body_start + s["offset"]
        if start + s["length"] > body_end:
            return None, [], (f"section {s['name']!r} ({s['length']} bytes at offset {s['offset']}) lies beyond the "
                              f"end of the file")
        table.append((s["name"], start, s["length"], s["sha256"]))
    table.sort(key=lambda t: t[1])
    for (a, a_start, a_len, _), (b, b_start, _, _) in zip(table, table[1:]):
        if b_start < a_start + a_len:
            return None, [], f"sections {a!r} and {b!r} overlap"
    return raw, table, None


def read_engine_file(path: str | Path) -> tuple[EngineHeader, dict[str, bytes], str]:
    """-> (header, sections, engine id), all from one sequential read of the file (a file replaced meanwhile cannot
    mix). Bounded: the header's and each section's declared size are checked against the file's before they are
    read; the sections are the one copy held (the rest is hashed a chunk at a time)."""
    path = Path(path)
    f, size = _open_regular(path)
    with f:
        fixed = f.read(_FIXED.size)
        if size < _FIXED.size + 32 or len(fixed) < _FIXED.size or fixed[:8] != MAGIC:
            raise EngineFileError(f"{path}: not a lineflow engine file (build one with python -m engine.build "
                                  "model.pt)")
        _, version, head_len = _FIXED.unpack(fixed)
        if version > FORMAT_VERSION:
            raise EngineFileError(f"{path}: engine format version {version} was written by a newer lineflow; this "
                                  f"one reads version {FORMAT_VERSION}: upgrade lineflow, or rebuild the engine with "
                                  "this one")
        if version < OLDEST_READABLE:
            raise EngineFileError(f"{path}: engine format version {version}; this lineflow reads versions "
                                  f"{OLDEST_READABLE}-{FORMAT_VERSION}: rebuild it with python -m engine.build")
        digest, body_start, body_end = hashlib.sha256(fixed), _FIXED.size + head_len, size - 32
        raw, table, problem = None, [], None
        if body_start > body_end:
            problem = f"its header of {head_len} bytes, beyond the end of the file ({size} bytes)"
        elif head_len > MAX_HEADER_BYTES:
            problem = f"its header of {head_len} bytes is over the limit of {MAX_HEADER_BYTES}"
        else:
            head = f.read(head_len)
            digest.update(head)
            raw, table, problem = _section_plan(head, body_start, body_end)
        sections, damaged, pos = {}, [], f.tell()
        for name, start, length, sha in table:
            _hash_through(f, digest, start - pos)
            data = f.read(length)
            digest.update(data)
            if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
                damaged.append(name)
            sections[name], pos = data, start + len(data)
        _hash_through(f, digest, body_end - pos)
        tail = f.read(32)
    if digest.digest() != tail:
        raise EngineFileError(f"{path}: damaged (checksum mismatch): the file was truncated or altered; rebuild it")
    digest.update(tail)
    file_id = digest.hexdigest()[:ENGINE_ID_DIGITS]  # engine_id of the whole file, from the same read
    if problem:
        raise EngineFileError(f"{path}: {problem}; rebuild the engine")
    if damaged:
        raise EngineFileError(f"{path}: section {damaged[0]!r} is damaged; rebuild the engine")
    try:
        raw.pop("format_version", None)
        header = EngineHeader.from_dict(upgrade_header(raw, version))
    except ValueError as e:  # the header's schema (engine/header.py) and JSON errors
        raise EngineFileError(f"{path}: malformed engine header ({str(e)[:200]}); rebuild the engine") from None
    except (KeyError, TypeError, RecursionError) as e:
        raise EngineFileError(f"{path}: malformed engine header ({type(e).__name__}); rebuild the engine") from None
    return header, sections, file_id
