"""model.pt: tensors and plain containers only, a format version and a checksum over everything.

Loaded with `torch.load(weights_only=True)`, so a file carrying pickled code is refused, never run.
The checksum (SHA-256 over the metadata as canonical JSON and every tensor's bytes) catches a
flipped byte in a tensor that would otherwise load silently.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO

import torch

from engine.common.errors import UserError
from engine.common.files import atomic_write
from train.model import FastFlow, FlowConfig

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelFileError", "save_model", "load_model", "load_model_bytes", "checksum"]

FORMAT = "lineflow-model"
FORMAT_VERSION = 1


class ModelFileError(UserError):
    """model.pt is missing, damaged, from another format version or not a lineflow model."""


def checksum(meta: dict, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(path: str | Path, model: FastFlow, meta: dict) -> None:
    """Write atomically (engine.common.files): never a partial model file."""
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict(), **meta}
    payload = {"meta": meta, "state_dict": state, "checksum": checksum(meta, state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialised first: a full disk then fails in the write, which names the file
    torch.save(payload, buf)
    with atomic_write(path) as f:
        f.write(buf.getbuffer())


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[FastFlow, dict]:
    """model.pt -> (model in eval mode, metadata). Raises ModelFileError with what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    with open(path, "rb") as f:
        return load_model_bytes(f, str(path), map_location)


def load_model_bytes(file: BinaryIO, path: str, map_location: str = "cpu") -> tuple[FastFlow, dict]:
    """load_model on an open binary file (an engine carries its model.pt); `path` names it in errors."""
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types for damaged/unsafe files
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it holds Python objects other than tensors (refused unread: model files load tensors only)"
        raise ModelFileError(f"{path}: not a readable lineflow model file: {first}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), dict) \
            or payload["meta"].get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a lineflow model file (no '{FORMAT}' header)")
    meta, state = payload["meta"], payload.get("state_dict")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version}, this lineflow reads version "
                             f"{FORMAT_VERSION}; retrain with this version (python -m train.fit)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: damaged (state_dict is not a dict of tensors)")
    if checksum(meta, state) != payload.get("checksum"):
        raise ModelFileError(f"{path}: checksum mismatch: the file was modified or damaged after it was written")
    try:
        model = FastFlow(FlowConfig.from_dict(meta["config"]))
        model.load_state_dict(state, strict=True)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ModelFileError(f"{path}: does not match its own config ({str(e).splitlines()[0][:160]})") from None
    return model.eval(), meta
