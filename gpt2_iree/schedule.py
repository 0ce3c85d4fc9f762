"""The learning rate of each step, computed on the host: it is an argument of
the module's `finetune`, so a schedule needs no rebuild.

As in Hugging Face's schedulers: a linear warm-up from peak/warmup to the peak
over the first `warmup` steps, then constant, or a linear or cosine decay that
would reach 0 one step after the run's last.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def check(schedule: str, warmup: int, steps: int) -> None:
    """Refuse a schedule that cannot run `steps` steps, before any work."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule {schedule!r} is invalid; valid: {', '.join(SCHEDULES)}")
    if not 0 <= warmup < steps:
        raise ValueError(f"--warmup-steps {warmup} is out of range for a run of {steps} steps; "
                         f"valid: 0 to {steps - 1}")


def learning_rate(step: int, steps: int, peak: float, schedule: str = "constant", warmup: int = 0) -> float:
    """The rate of step `step` (0-based) of a run of `steps` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    left = 1 - (step - warmup) / (steps - warmup)  # 1 at the first decaying step, 1/n at the last
    if schedule == "linear":
        return peak * left
    return peak * 0.5 * (1 + math.cos(math.pi * (1 - left)))
