"""How long, at what precision and by which step the flow trains: the learning-rate schedule, early stopping on the
held-out likelihood, and the training precision and step the machine runs fastest.

Early stopping reads only good images (the held-out tenth train.fit keeps for the threshold): once the held-out
negative log-likelihood per dimension has gained less over the last PLATEAU_EPOCHS epochs than PLATEAU_SHARE of
what it gained since the first, the run is planned to end there: the learning rates decay over the tail the
"anneal" schedule would have given a run of that length (its last ANNEAL_FRACTION), and the run stops after it.
So a stopped run ends the way a full one does, annealed, not at a constant rate.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from train.fused_tail import available as fused_tail_available

__all__ = ["LR_SCHEDULES", "ANNEAL_FRACTION", "PLATEAU_EPOCHS", "PLATEAU_SHARE", "TRAIN_PRECISIONS",
           "TRAIN_STEPS", "schedule_factor", "set_learning_rates", "plateau", "anneal_epochs", "fastest_precision",
           "fastest_step"]

LR_SCHEDULES = ("constant", "cosine", "anneal")
ANNEAL_FRACTION = 0.2  # "anneal": the share of the run, at its end, over which the learning rates decay
PLATEAU_EPOCHS = 3  # early stopping: the window over which the held-out NLL's gain is read
# ... and the share of its gain since epoch 1 under which it has stopped improving (0.05 ended MTD at 17 epochs:
# held-out NLL 0.384 against 0.359, pixel AUROC -0.004; benchmarks/NOTES.md, "Training at the floor of the machine")
PLATEAU_SHARE = 0.02
TRAIN_PRECISIONS = ("bf16", "fp32")  # the flow's forward under bf16 autocast (loss, optimiser fp32), or all fp32
# the coupling's element-wise tail: one native pass each way (train/fused_tail.py; CPU), or eager PyTorch (reference)
TRAIN_STEPS = ("fused", "eager")
CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # /proc/cpuinfo flags: bf16 in hardware


def schedule_factor(schedule: str, step: int, total_steps: int, decay_start: int | None = None) -> float:
    """The learning-rate multiplier at `step`: 1 for "constant"; a half cosine to 0 over the whole run
    ("cosine") or over its last ANNEAL_FRACTION ("anneal", constant before), or from `decay_start` on where early
    stopping has moved the run's end to `total_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {schedule!r}")
    if schedule == "constant":
        return 1.0
    start = decay_start if decay_start is not None else \
        0 if schedule == "cosine" else int(total_steps * (1 - ANNEAL_FRACTION))
    if step < start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, total_steps - start))))


def set_learning_rates(optimisers: list[tuple[torch.optim.Optimizer | None, float]], factor: float) -> None:
    """Each (optimiser, its configured learning rate) at `factor` x that rate."""
    for opt, lr in optimisers:
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr * factor


def plateau(holdout_nll: list[float]) -> tuple[float, float] | None:
    """(gain over the last PLATEAU_EPOCHS epochs, gain since epoch 1) of the best held-out NLL per dimension once the
    first is under PLATEAU_SHARE of the second (it has stopped improving); None while it improves, and before
    2 x PLATEAU_EPOCHS epochs."""
    if len(holdout_nll) < 2 * PLATEAU_EPOCHS:
        return None
    best = min(holdout_nll)
    recent, since_first = min(holdout_nll[:-PLATEAU_EPOCHS]) - best, holdout_nll[0] - best
    return (recent, since_first) if recent <= PLATEAU_SHARE * max(since_first, 0.0) else None


def anneal_epochs(epochs_run: int) -> int:
    """The decay tail of a run planned to end after `epochs_run` + tail epochs: its last ANNEAL_FRACTION."""
    return max(1, math.ceil(round(epochs_run * ANNEAL_FRACTION / (1 - ANNEAL_FRACTION), 6)))  # 4 x 0.25: 1, not 2


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def fastest_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why): bf16 where the hardware computes it (a CUDA GPU that supports it; a CPU with AMX-BF16 or
    AVX512-BF16: on other CPUs oneDNN emulates bf16, slower than fp32), else fp32."""
    if device.type == "cuda":
        return ("bf16", "this GPU computes bf16") if torch.cuda.is_bf16_supported() else \
            ("fp32", "this GPU has no bf16")
    found = [name for flag, name in CPU_BF16_FLAGS.items() if flag in _cpu_flags()]
    if found:
        return "bf16", f"this CPU has {' and '.join(found)}"
    return "fp32", "this CPU has no bf16 instructions (bf16 would be emulated, slower than fp32)"


def fastest_step(device: torch.device, precision_option: str) -> tuple[str, str]:
    """(step, why): "fused" on a CPU where lineflow's native extension is built, else "eager"; `--train-precision
    fp32` (precision_option "fp32") asks for the reference path, eager."""
    if precision_option == "fp32":
        return "eager", "--train-precision fp32: the reference path"
    if device.type != "cpu":
        return "eager", "the fused tail is a CPU kernel"
    if not fused_tail_available():
        return "eager", "train._native is not built: run `pip install -e .`"
    return "fused", "the coupling's element-wise tail in one native pass"
