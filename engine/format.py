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
import struct
from pathlib import Path

from engine.common.errors import UserError
from engine.common.files import atomic_write
from engine.header import EngineHeader

__all__ = ["MAGIC", "FORMAT_VERSION", "EngineFileError", "write_engine", "read_engine"]

MAGIC = b"LFENGINE"
# 2: CPU engines end at per-scale maps, fused natively (header.scoring); 3: precision bf16-flow;
# 4: rectangular inputs (input_size and scoring sizes are [height, width] pairs); 5: precisions int8 and
# int8-backbone (the onnx section carries NNCF's quantize/dequantize pairs); 6: scoring.sigma one a scale
# (header.py reads the one number of 2-5 as every scale's); 7: precision bf16-deep (sections onnx_head, onnx_tail);
# 8: torch engines carry the kernels section (the CUDA path's folded flow) and the scoring
FORMAT_VERSION = 8
OLDEST_READABLE = 2  # versions 2 and 3 are version 4 with square inputs (header.py reads their ints as squares)
_FIXED = struct.Struct("<8sIQ")  # magic, version, header length


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
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise EngineFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise EngineFileError(f"{path}: is a folder, not an engine file") from None
    except OSError as e:
        raise EngineFileError(f"{path}: cannot read ({e.strerror})") from None
    if len(blob) < _FIXED.size + 32 or blob[:8] != MAGIC:
        raise EngineFileError(f"{path}: not a lineflow engine file (build one with python -m engine.build model.pt)")
    _, version, head_len = _FIXED.unpack_from(blob)
    if version > FORMAT_VERSION:
        raise EngineFileError(f"{path}: engine format version {version} was written by a newer lineflow; this one "
                              f"reads version {FORMAT_VERSION}: upgrade lineflow, or rebuild the engine with this one")
    if version < OLDEST_READABLE:
        raise EngineFileError(f"{path}: engine format version {version}; this lineflow reads versions "
                              f"{OLDEST_READABLE}-{FORMAT_VERSION}: rebuild it with python -m engine.build")
    if hashlib.sha256(blob[:-32]).digest() != blob[-32:]:
        raise EngineFileError(f"{path}: damaged (checksum mismatch): the file was truncated or altered; rebuild it")
    body_start = _FIXED.size + head_len
    try:
        raw = json.loads(blob[_FIXED.size:body_start])
        if not isinstance(raw, dict) or not isinstance(raw.get("sections"), list):
            raise EngineFileError(f"{path}: engine header lacks a section table; rebuild the engine")
        table = raw.pop("sections")
        raw.pop("format_version", None)
        sections = {}
        for s in table:
            if not (isinstance(s["offset"], int) and isinstance(s["length"], int) and s["offset"] >= 0
                    and isinstance(s["name"], str)):
                raise EngineFileError(f"{path}: malformed section table; rebuild the engine")
            data = blob[body_start + s["offset"]:body_start + s["offset"] + s["length"]]
            if len(data) != s["length"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
                raise EngineFileError(f"{path}: section {s['name']!r} is damaged; rebuild the engine")
            sections[s["name"]] = data
        header = EngineHeader.from_dict(raw)
    except EngineFileError:
        raise
    except ValueError as e:  # the header's schema (engine/header.py) and JSON errors
        raise EngineFileError(f"{path}: malformed engine header ({str(e)[:200]}); rebuild the engine") from None
    except (KeyError, TypeError, RecursionError) as e:
        raise EngineFileError(f"{path}: malformed engine header ({type(e).__name__}); rebuild the engine") from None
    return header, sections
