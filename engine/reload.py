"""An engine that follows its file: a new engine file at the same path is picked up between batches.

`engine.run --reload` and `engine.serve --reload` score through a ReloadingEngine. A watcher thread
looks at the file's identity (device, inode, size, modification time) every RELOAD_POLL_S seconds,
or at once when asked (SIGHUP in the CLIs); a changed file is loaded beside the running engine (its
checksums and self-test included, in the watcher's thread: the line keeps scoring meanwhile), checked
to fit (the same input size and tiling: the sources and sinks were set up for them), then swapped in
by one reference assignment. The old engine is closed once its calls in flight end, so no frame is
lost or scored twice, and each Result names the engine that scored it (Result.engine, .threshold).

A file that does not load (half copied, damaged, a backend this process cannot run) or does not fit is
refused in one line and the running engine stays; the same file changing again is tried again. Write
the new file beside the old one and rename it over it (`mv`, an atomic replace): a file rewritten in
place is read half-written, refused, then picked up once whole.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.common.errors import UserError, one_line
from engine.results import Result
from engine.runtime import Engine, EngineClosedError

__all__ = ["ReloadingEngine", "RELOAD_POLL_S"]

RELOAD_POLL_S = 0.5  # how often the watcher looks at the file: a new engine is live within about this long


def _file_identity(path: Path) -> tuple | None:
    """What changes when the file is replaced or rewritten; None while it is missing (mid-rename)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ReloadingEngine:
    """engine.Engine's interface (ScoringEngine) over whichever engine the file at `path` holds now.

    `on_event(line)` gets one line per swap or refusal (the CLIs print it on stderr). Whatever follows the engine
    (a drift monitor, the sinks) reads each result's `engine` and `threshold`."""

    def __init__(self, path: str | Path, threads: int | None = None, busy_wait: bool = True,
                 poll_s: float = RELOAD_POLL_S, on_event: Callable[[str], None] = lambda line: None):
        self.path, self.threads, self.busy_wait, self.poll_s = Path(path), threads, busy_wait, poll_s
        self.on_event = on_event
        self._identity = _file_identity(self.path)
        self.current = Engine(self.path, threads, busy_wait)  # a bad first file fails here, as without --reload
        self.swaps, self.refused = 0, 0
        self.load_seconds: list[float] = []  # per swap: loading the new engine, while the old one scored
        self._refused_identity: tuple | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._swap_lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="lineflow-reload", daemon=True)
        self._watcher.start()

    # what the stream and the sinks read: the current engine's
    @property
    def threshold(self) -> float:
        return self.current.threshold

    @property
    def backend_name(self) -> str:
        return self.current.backend_name

    @property
    def precision(self) -> str:
        return self.current.precision

    @property
    def engine_id(self) -> str:
        return self.current.engine_id

    @property
    def header(self):
        return self.current.header

    @property
    def input_size(self) -> tuple[int, int]:
        return self.current.input_size

    @property
    def tiling(self):
        return self.current.tiling

    def _on_current(self, call: Callable[[Engine], object]):
        """call(engine) on the engine current when the call starts; a swap closing it in between: on the new one,
        so that no frame is lost (a call is scored whole by one engine)."""
        while True:
            engine = self.current
            try:
                return call(engine)
            except EngineClosedError:
                if self._stop.is_set() or engine is self.current:
                    raise

    def score(self, frames: list[np.ndarray], bgr: bool = False, with_maps: bool = True) -> list[Result]:
        return self._on_current(lambda engine: engine.score(frames, bgr, with_maps))

    def infer(self, frames, bgr: bool = False) -> Result | list[Result]:
        return self._on_current(lambda engine: engine.infer(frames, bgr))

    def reload_now(self) -> None:
        """Look at the file at once (the CLIs' SIGHUP handler); safe to call from a signal handler."""
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            asked = self._wake.is_set()
            self._wake.clear()
            if self._stop.is_set():
                return
            identity = _file_identity(self.path)
            if identity is None or not asked and identity in (self._identity, self._refused_identity):
                continue
            self.check(identity)

    def check(self, identity: tuple | None = None) -> bool:
        """Load the file if it holds another engine than the current one and swap it in; True on a swap."""
        with self._swap_lock:
            identity = identity or _file_identity(self.path)
            started = time.perf_counter()
            try:
                new = Engine(self.path, self.threads, self.busy_wait)
            except UserError as e:  # EngineFileError: missing, half written, damaged, a backend not here
                return self._refuse(identity, one_line(e, 300))
            except Exception as e:  # noqa: BLE001 - any failure to load leaves the running engine in place
                return self._refuse(identity, f"{self.path}: cannot be loaded ({one_line(e, 300)})")
            old = self.current
            if new.engine_id == old.engine_id:  # the same bytes (touched, or copied again): nothing to swap
                new.close()
                self._identity = identity
                return False
            misfit = self._misfit(old, new)
            if misfit:
                new.close()
                return self._refuse(identity, f"{self.path}: {misfit}")
            self.current = new  # one assignment: the next batch runs on it
            self.load_seconds.append(time.perf_counter() - started)
            self._identity, self._refused_identity = identity, None
            self.swaps += 1
            old.close()  # after its calls in flight
            self.on_event(f"reload: {self.path.name}: engine {old.engine_id} -> {new.engine_id} ({new.backend_name} "
                          f"{new.precision}, threshold {old.threshold:.4f} -> {new.threshold:.4f}; loaded in "
                          f"{self.load_seconds[-1]:.1f} s beside the running engine)")
            return True

    @staticmethod
    def _misfit(old: Engine, new: Engine) -> str | None:
        if new.input_size != old.input_size:
            return (f"input size {new.input_size[1]}x{new.input_size[0]} differs from the running engine's "
                    f"{old.input_size[1]}x{old.input_size[0]}")
        if new.tiling != old.tiling:
            return "its tiling differs from the running engine's"
        return None

    def _refuse(self, identity: tuple | None, reason: str) -> bool:
        self._refused_identity = identity
        self.refused += 1
        self.on_event(f"reload refused: {reason}; engine {self.current.engine_id} keeps running")
        return False

    def run_summary(self) -> str | None:
        if not (self.swaps or self.refused):
            return None
        return (f"reload: {self.swaps} engine swaps, {self.refused} files refused; ended on engine "
                f"{self.current.engine_id}")

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._watcher.join(10.0)
        with self._swap_lock:
            self.current.close()

    def __enter__(self) -> ReloadingEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
