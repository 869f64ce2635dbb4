"""Learning-rate schedules, shared by the SFT stage and RL steps."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, total: int, base: float, schedule: str = "constant", warmup_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (1-based) of `total`.

    Linear warm-up to `base` over the first `warmup_steps` steps (step k gets base·k/warmup, so the
    first step is not wasted at 0), then "constant" keeps `base` and "cosine" decays it to
    `base·min_lr_ratio` at step `total`: base·(r + (1 − r)·½(1 + cos(π·p))) with p the fraction of the
    post-warm-up steps done — Hugging Face's `get_cosine_schedule_with_warmup` with verl's
    `min_lr_ratio`, counted from 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r} (choices: {', '.join(SCHEDULES)})")
    if warmup_steps > 0 and step <= warmup_steps:
        return base * step / warmup_steps
    if schedule == "constant":
        return base
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return base * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
