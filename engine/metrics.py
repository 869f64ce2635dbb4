"""Per-phase timers and the run's metrics log (one JSON object per step in metrics.jsonl)."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates wall time per named phase; a phase entered twice in a step adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


class Progress:
    """A stage's progress: a tqdm bar updating in place on a terminal (off elsewhere, e.g. under
    `ray job logs`, where each step's log line carries the same fields) and the ETA from the mean
    step time so far."""

    def __init__(self, stage: str, total: int, start: int = 1):
        from tqdm import tqdm

        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.bar = tqdm(total=total, initial=start - 1, desc=stage, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def update(self, step: int, **fields: float) -> str:
        """Marks `step` done, shows `fields` beside the bar, returns the ETA as h:mm:ss."""
        self.done += 1
        eta = (time.perf_counter() - self.t0) / self.done * (self.total - step)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in fields.items()}, refresh=False)
        self.bar.update(1)
        if step >= self.total:
            self.bar.close()
        return time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta)))


class MetricsLog:
    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
