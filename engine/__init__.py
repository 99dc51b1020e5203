"""lineflow's deployable engine: `python -m engine.build model.pt`, then `python -m engine.run` or the API.

    import engine
    eng = engine.load("model.engine")
    result = eng.infer(frame)               # .score, .is_anomalous, .anomaly_map (frame size)
    for r in engine.run(eng, "camera:0"):   # or a video, folder, image file, numpy arrays
        ...

This package is the run side: it imports numpy and the engine's backend only (no torch, nothing of
train/, unless the engine's backend is torch or TensorRT). engine.build (the build side) and
engine.common (what training shares with it) live below it.
"""

from __future__ import annotations

import sys
import types

from engine.format import EngineFileError
from engine.runtime import Engine, Result, load
from engine.stream import StreamStats, run

__all__ = ["Engine", "EngineFileError", "Result", "StreamStats", "load", "run"]


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


sys.modules[__name__].__class__ = _Package
