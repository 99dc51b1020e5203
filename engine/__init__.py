"""lineflow's deployable engine: `python -m engine.build model.pt`, then `python -m engine.run` or the API.

    import engine
    eng = engine.load("model.engine")
    result = eng.infer(frame)               # .score, .is_anomalous, .anomaly_map (frame size)
    for r in engine.run(eng, "camera:0"):   # or a video, folder, image file, numpy arrays
        ...

This package is the run side: it imports numpy and the engine's backend only (no torch, nothing of
train/, unless the engine's backend is torch or TensorRT). engine.builder (the build side) and
engine.common (what training shares with it) live below it; the public names below load on first use.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["Engine", "EngineFileError", "Result", "StreamStats", "load", "run"]
# each public name -> the module that defines it, imported on first use: training imports engine.common (the
# shared pieces) without loading the run side, which `import engine.common` would otherwise bring in through here
_HOMES = {"Engine": "engine.runtime", "EngineFileError": "engine.format", "Result": "engine.results",
          "StreamStats": "engine.stream", "load": "engine.runtime", "run": "engine.stream"}


class _Package(types.ModuleType):
    """`engine.run` is the streaming function, and `python -m engine.run` is the CLI module engine/run.py.

    Importing a submodule sets it as an attribute of its package, so `import engine.run` would replace the
    function with the module. This package keeps its public names: the CLI module stays importable as
    `from engine.run import main` (and in sys.modules), the attribute stays the function.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name not in _HOMES:
            raise AttributeError(f"module 'engine' has no attribute {name!r}")
        value = getattr(importlib.import_module(_HOMES[name]), name)
        super().__setattr__(name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *__all__})


sys.modules[__name__].__class__ = _Package
