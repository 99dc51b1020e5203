"""The checks every typed file schema applies to the JSON it reads (the engine header, its scoring spec).

Each raises ValueError naming the field and what it accepts; the readers turn that into one line that
names the file (engine/format.py).
"""

from __future__ import annotations

import math
from dataclasses import fields

from engine.common.geometry import as_hw

__all__ = ["integer", "number", "strict_kwargs", "hw_pair"]


def integer(name: str, v, low: int = 1) -> int:
    """An int >= low (a bool is not one)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, not {v!r}")
    return v


def number(name: str, v) -> float:
    """A finite int or float, as float."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, not {v!r}")
    return float(v)


def strict_kwargs(cls, d, name: str | None = None) -> dict:
    """d, a JSON object whose keys are all fields of the dataclass cls: unknown keys are refused (`name`: what the
    message calls d; the class's name by default)."""
    name = name or cls.__name__
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a JSON object, not {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{name} has unknown keys {sorted(unknown)} (written by another lineflow?)")
    return d


def hw_pair(name: str, v) -> tuple[int, int]:
    """A [height, width] pair, or an int N (files before rectangular inputs: N x N)."""
    try:
        hw = as_hw(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer or a [height, width] pair of integers, not {v!r}") from None
    for side in hw:
        integer(name, side)
    return hw
