"""lineflow's deployable engine: `python -m engine.build model.pt`, then `python -m engine.run` or the API.

    import engine
    eng = engine.load("model.engine")
    result = eng.infer(frame)               # .score, .is_anomalous, .anomaly_map (frame size)
    for r in engine.run(eng, "camera:0"):   # or a video, folder, image file, numpy arrays
        ...

Running imports numpy and the engine's backend only; building (engine.build) imports torch.
"""

from __future__ import annotations

from engine.format import EngineFileError
from engine.runtime import Engine, Result, load
from engine.stream import StreamStats, run

__all__ = ["Engine", "EngineFileError", "Result", "StreamStats", "load", "run"]
