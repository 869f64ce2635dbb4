"""Per-phase timers and the run's metrics log (one JSON object per step in metrics.jsonl)."""

from __future__ import annotations

import json
import math
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
