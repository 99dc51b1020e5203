"""Drift alarms, label-free: does the line still look like the engine's training, and do its scores still behave?

Two kinds, each over a rolling window of the stream's scored frames, in frame order:

    input   the window's median of each frame statistic (engine.common.frame_stats: per-channel brightness and
            contrast, frame area and aspect, in log units) against the training frames' range (quantiles, widened
            by a margin), as the engine header's `input_stats` records it. A median leaves the range only when most
            of the window does: one odd frame, or a rare setting the training saw now and then, raises nothing; a
            new frame size, lighting or camera gain raises it within half a window.
    score   the window's median score against the held-out good scores the engine carries
            (header.model_threshold["holdout_scores"]): above their 90 % quantile means most recent frames score
            like the worst tenth of good ones (a few defects, which the median ignores, raise nothing).

A kind is raised when its window crosses the bound and cleared when it is back inside a narrower one (hysteresis:
a window hovering at the bound does not flap). Each change is a DriftEvent with the measured numbers; every
observed Result carries the kinds in force (`result.drift`). Nothing here changes a verdict. An engine without
`input_stats` (built before model format 7) watches its scores only; one without held-out scores its input only.
The defaults were chosen on the shared data, label-free (docs/line-loop.md, "Drift alarms";
research/line_loop_drift.py reproduces them).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.common.frame_stats import CHANNELS, STATS_METHOD, InputStats, frame_stats
from engine.header import EngineHeader
from engine.results import Result, Status

__all__ = ["DriftMonitor", "DriftEvent", "DriftSettings", "KINDS", "INPUT_WINDOW", "INPUT_LEVELS", "SIZE_LEVELS",
           "INPUT_MARGIN", "INPUT_FLOOR", "SCORE_WINDOW", "SCORE_LEVEL", "SCORE_CLEAR_LEVEL", "MIN_HOLDOUT_SCORES"]

KINDS = ("input", "score")
# Input: the median of the last INPUT_WINDOW frames. Odd, so the median is a frame's own value; 9 frames raise a
# change of setting on its 5th frame (issue 44 asks within 10) and need 5 odd frames in 9 to raise without one.
INPUT_WINDOW = 9
# The training range of brightness and contrast: their 1 % and 99 % quantiles (a few odd training frames do not
# widen it, as the minimum and maximum would). They vary in runs on a line (BSD's soiling builds up over days, MTD
# has six lighting levels), so a window of the training's darkest frames sits near its end: hence the margin.
INPUT_LEVELS = (0.01, 0.99)
# The training range of frame area and aspect: their 5 % and 95 % quantiles. Sizes come in settings; one that made
# under 5 % of the training frames (BSD's later capture setting: 3 %) lies outside, so a window of it raises (the
# model underfits such a setting: docs/lab/search-rounds.md, round 18). Hand-cut tiles of many sizes (MTD) span it.
SIZE_LEVELS = (0.05, 0.95)
# Both ranges are compared in log units (a gain, an exposure or a zoom multiplies) and widened each side by this
# share of their width ...
INPUT_MARGIN = 0.25
# ... and, for brightness and contrast, by at least this much (log units: 5 %), so that training frames all alike
# (a range of width 0) still tolerate sensor noise. Sizes get no floor: a size the training never had is drift.
INPUT_FLOOR = 0.05
# Score: the median of the last SCORE_WINDOW scored frames against the held-out good scores' SCORE_LEVEL quantile
# (raise above it) and SCORE_CLEAR_LEVEL quantile (clear at or below it). 25 frames: a median of 25 good frames
# passes the 90 % quantile only if 13 of them do (odds about 1e-7 for independent frames); defects under half the
# window do not move it.
SCORE_WINDOW = 25
SCORE_LEVEL = 0.9
SCORE_CLEAR_LEVEL = 0.75
EVENTS_KEPT = 1000  # changes waiting for events_until (a caller that never asks loses the oldest, not memory)
MIN_HOLDOUT_SCORES = 5  # fewer held-out scores than this carry no distribution: score drift is off
LOG_FLOOR = 1e-3  # brightness or contrast below this (of the [0, 1] scale) is black: compared as this
NUMBERS = (*(f"brightness {c}" for c in CHANNELS), *(f"contrast {c}" for c in CHANNELS), "area", "aspect")


@dataclass(frozen=True)
class DriftSettings:
    """The alarms' windows and bounds (the module's constants; research/line_loop_drift.py tries others)."""

    input_window: int = INPUT_WINDOW
    input_levels: tuple[float, float] = INPUT_LEVELS
    size_levels: tuple[float, float] = SIZE_LEVELS
    input_margin: float = INPUT_MARGIN
    input_floor: float = INPUT_FLOOR
    score_window: int = SCORE_WINDOW
    score_level: float = SCORE_LEVEL
    score_clear_level: float = SCORE_CLEAR_LEVEL


@dataclass(frozen=True)
class DriftEvent:
    """A kind of drift raised or cleared at a frame, with what was measured (`numbers`: per statistic the window's
    median and the bounds it was held to)."""

    kind: str  # "input" or "score"
    raised: bool  # False: cleared
    index: int  # the frame whose result changed the state
    time: float  # that frame's capture time (time.time())
    in_force: tuple[str, ...]  # the kinds in force after the change
    numbers: dict = field(default_factory=dict)
    engine: str | None = None  # the engine that scored the frame
    text: str = ""  # the measured numbers in words

    def line(self) -> str:
        """The stderr line: 'drift: input drift raised at frame N: ...'."""
        return f"drift: {self.kind} drift {'raised' if self.raised else 'cleared'} at frame {self.index}: {self.text}"

    def to_json(self) -> dict:
        """The MQTT message (PREFIX/CAMERA/drift, retained): the kinds in force (false: none) and the change."""
        return {"drift": list(self.in_force) or False, "kind": self.kind,
                "state": "raised" if self.raised else "cleared", "index": self.index, "time": self.time,
                "engine": self.engine, "numbers": self.numbers, "text": self.text}


class HeaderedEngine(Protocol):
    """What the monitor reads of an engine it follows (engine.Engine, engine.reload.ReloadingEngine)."""

    header: EngineHeader
    engine_id: str | None


def _fmt(name: str, *values: float) -> str:
    """A value or a range of a statistic, as the event's text shows it."""
    return "-".join(f"{v:.0f}" if name == "area" else f"{v:.3g}" for v in values) + (" px" if name == "area" else "")


def _logged(numbers) -> np.ndarray:
    """Statistics in log units: a change of gain, exposure or lighting multiplies brightness and contrast, a zoom the
    area, so a margin is a factor (values below LOG_FLOOR, black, count as it)."""
    return np.log(np.maximum(np.asarray(numbers, dtype=np.float64), LOG_FLOOR))


class _InputWatch:
    """The input kind: each live frame's statistics (NUMBERS, in log units) against the training range of each."""

    def __init__(self, stats: InputStats, s: DriftSettings):
        lo, hi = (_logged([*stats.at("brightness", q), *stats.at("contrast", q), stats.at("area", qs),
                           stats.at("aspect", qs)]) for q, qs in zip(s.input_levels, s.size_levels))
        floor = np.array([s.input_floor] * 6 + [0.0, 0.0])
        widen = s.input_margin * (hi - lo) + floor
        self.stats, self.lo, self.hi = stats, lo, hi
        self.raise_lo, self.raise_hi = lo - widen, hi + widen
        self.clear_lo, self.clear_hi = lo - widen / 2, hi + widen / 2

    def outside(self, median: np.ndarray, raised: bool) -> np.ndarray:
        lo, hi = (self.clear_lo, self.clear_hi) if raised else (self.raise_lo, self.raise_hi)
        return (median < lo) | (median > hi)

    def numbers(self, median: np.ndarray, which: np.ndarray) -> dict:
        out = {}
        for i in np.flatnonzero(which):
            out[NUMBERS[i]] = {"window": round(math.exp(median[i]), 6),
                               "training": [round(math.exp(self.lo[i]), 6), round(math.exp(self.hi[i]), 6)],
                               "bounds": [round(math.exp(self.raise_lo[i]), 6), round(math.exp(self.raise_hi[i]), 6)]}
        return out


class _ScoreWatch:
    def __init__(self, holdout: list[float], s: DriftSettings):
        h = np.asarray(holdout, dtype=np.float64)
        self.holdout = holdout
        self.n, self.median = len(h), float(np.median(h))
        self.raise_at, self.clear_at = float(np.quantile(h, s.score_level)), float(np.quantile(h, s.score_clear_level))


def _holdout_scores(header: EngineHeader) -> list[float] | None:
    scores = (header.model_threshold or {}).get("holdout_scores")
    ok = isinstance(scores, list) and len(scores) >= MIN_HOLDOUT_SCORES and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores)
    return [float(x) for x in scores] if ok else None


class DriftMonitor:
    """Watches the stream's frames and scores (observe, in frame order, from one thread) and keeps the kinds in force
    and the changes (events_until). Built from an engine header (from_header) or following an engine whose file may
    be swapped mid-run (for_engine: the first result of another engine re-bases it on that engine's header)."""

    def __init__(self, header: EngineHeader, engine_id: str | None = None, settings: DriftSettings = DriftSettings(),
                 engine: HeaderedEngine | None = None):
        self.settings, self.engine = settings, engine
        self.input_frames: deque = deque(maxlen=settings.input_window)  # (8,) per frame, NUMBERS' order
        self.frame_sizes: deque = deque(maxlen=settings.input_window)
        self.scores: deque = deque(maxlen=settings.score_window)
        self.raised: set[str] = set()
        self.out: dict[str, dict] = {}  # per kind in force, what raised it (cleared events report those numbers)
        self.events: deque[DriftEvent] = deque(maxlen=EVENTS_KEPT)
        self.notes: list[str] = []  # why a kind is not watched, for the caller to print once
        self._lock = threading.Lock()
        self.input: _InputWatch | None = None
        self.score: _ScoreWatch | None = None
        self.engine_id: str | None = None
        self.rebase(header, engine_id)

    @classmethod
    def from_header(cls, header: EngineHeader, engine_id: str | None = None,
                    settings: DriftSettings = DriftSettings()) -> DriftMonitor:
        return cls(header, engine_id, settings)

    @classmethod
    def for_engine(cls, engine: HeaderedEngine, settings: DriftSettings = DriftSettings()) -> DriftMonitor:
        return cls(engine.header, engine.engine_id, settings, engine)

    @property
    def watching(self) -> tuple[str, ...]:
        return tuple(k for k, w in (("input", self.input), ("score", self.score)) if w is not None)

    def rebase(self, header: EngineHeader, engine_id: str | None = None, at: Result | None = None) -> None:
        """Compare with another engine's training from now on (an engine swapped mid-run). The live frames' window
        stays (it does not depend on the engine); the scores' window restarts unless the held-out scores are the
        same (a retuned threshold over the same graph scores alike). A kind the new engine cannot watch is dropped
        (a cleared event says so where it was in force)."""
        off: dict[str, str] = {}  # kind -> why it is not watched
        stats = header.input_stats
        if stats is None:
            off["input"] = ("input drift off: the engine carries no statistics of its training frames (built from a "
                            "model.pt before format 7; rebuild from a model trained with this lineflow)")
            new_input = None
        elif stats.get("method") != STATS_METHOD:
            off["input"] = (f"input drift off: the engine's training statistics were computed as "
                            f"{stats.get('method')!r}, this lineflow computes {STATS_METHOD!r}")
            new_input = None
        else:
            new_input = _InputWatch(InputStats.from_dict(stats), self.settings)
        holdout = _holdout_scores(header)
        if holdout is None:
            off["score"] = f"score drift off: the engine carries fewer than {MIN_HOLDOUT_SCORES} held-out good scores"
        with self._lock:
            if self.score is not None and (holdout is None or holdout != self.score.holdout):
                self.scores.clear()
            self.input = new_input
            self.score = None if holdout is None else _ScoreWatch(holdout, self.settings)
            self.engine_id = engine_id
            self.notes = list(off.values()) if len(off) < len(KINDS) else [
                "off: the engine carries neither statistics of its training frames nor held-out good scores"]
            for kind in sorted(self.raised - set(self.watching)):
                self._change(kind, False, at, {}, f"not watched by engine {engine_id} ({off[kind]})")

    def observe(self, frame: np.ndarray | None, result: Result) -> None:
        """Take one result and its frame (results in frame order; dropped frames skipped): update the windows,
        raise or clear, and set `result.drift` to the kinds in force (None when nothing is watched)."""
        scored = result.status is Status.OK and frame is not None
        measured = scored and self.input is not None
        stats = frame_stats(frame, result.bgr) if measured else None
        self.update(np.asarray(frame).shape[:2] if measured else None, stats, result)

    def update(self, size: tuple[int, int] | None, stats: np.ndarray | None, result: Result) -> None:
        """observe, given the frame's (height, width) and frame_stats (None: not measured, e.g. not scored)."""
        if (self.engine is not None and result.engine is not None and result.engine != self.engine_id
                and result.status is Status.OK):
            self.rebase(self.engine.header, self.engine.engine_id, result)
        with self._lock:
            if stats is not None and size is not None and self.input is not None:
                h, w = size
                self.input_frames.append(_logged([*stats, h * w, w / h]))
                self.frame_sizes.append((h, w))
                self._decide_input(result)
            if result.status is Status.OK and self.score is not None and result.score is not None:
                self.scores.append(result.score)
                self._decide_score(result)
            result.drift = self._in_force()

    def in_force(self) -> list[str] | None:
        """The kinds raised now, in KINDS' order ([]: none), or None when nothing is watched."""
        with self._lock:
            return self._in_force()

    def events_until(self, index: int | None = None) -> list[DriftEvent]:
        """The changes at frames up to `index` (all: None), oldest first, each handed out once."""
        out = []
        with self._lock:
            while self.events and (index is None or self.events[0].index <= index):
                out.append(self.events.popleft())
        return out

    # under self._lock
    def _in_force(self) -> list[str] | None:
        return [k for k in KINDS if k in self.raised] if self.watching else None

    def _decide_input(self, result: Result) -> None:
        watch, s = self.input, self.settings
        if len(self.input_frames) < s.input_window:
            return
        median = np.median(np.stack(self.input_frames), axis=0)
        raised = "input" in self.raised
        out = watch.outside(median, raised)
        if out.any() == raised:
            return
        which = out if not raised else np.isin(np.arange(len(NUMBERS)),
                                                [NUMBERS.index(n) for n in self.out.get("input", {})])
        numbers = watch.numbers(median, which)
        sizes = Counter(self.frame_sizes).most_common(1)[0][0]
        parts = [f"{name} {_fmt(name, v['window'])}" + (f" (frames {sizes[1]}x{sizes[0]})" if name == "area" else "")
                 + f" {'vs' if not raised else 'back near'} training {_fmt(name, *v['training'])}"
                 for name, v in numbers.items()]
        (lo, hi), (slo, shi) = ([f"{q * 100:g}" for q in levels] for levels in (s.input_levels, s.size_levels))
        text = "; ".join(parts) + (f" (median of the last {s.input_window} frames; training: the {lo}-{hi} % "
                                   f"quantiles of {watch.stats.n_frames} frames, sizes {slo}-{shi} %)")
        self._change("input", not raised, result, numbers, text)

    def _decide_score(self, result: Result) -> None:
        watch, s = self.score, self.settings
        if len(self.scores) < s.score_window:
            return
        median = float(np.median(self.scores))
        raised = "score" in self.raised
        if not raised and median > watch.raise_at:
            bound, level = watch.raise_at, s.score_level
        elif raised and median <= watch.clear_at:
            bound, level = watch.clear_at, s.score_clear_level
        else:
            return
        numbers = {"score": {"window": round(median, 6), "holdout_quantile": round(bound, 6), "level": level,
                             "holdout_median": round(watch.median, 6), "holdout_n": watch.n}}
        text = (f"median score of the last {s.score_window} frames {median:.4g} "
                f"{'above' if not raised else 'at or below'} the held-out good scores' {level:.0%} quantile "
                f"{bound:.4g} ({watch.n} scores, median {watch.median:.4g})")
        self._change("score", not raised, result, numbers, text)

    def _change(self, kind: str, raised: bool, result: Result | None, numbers: dict, text: str) -> None:
        if raised:
            self.raised.add(kind)
            self.out[kind] = numbers
        else:
            self.raised.discard(kind)
            self.out.pop(kind, None)
        index = result.index if result is not None else -1
        when = result.timestamp if result is not None and result.timestamp is not None else time.time()
        self.events.append(DriftEvent(kind, raised, index, when, tuple(k for k in KINDS if k in self.raised),
                                      numbers, None if result is None else result.engine, text))
