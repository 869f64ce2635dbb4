"""Where a run's metrics go (`trainer.loggers`): metrics.jsonl always — checkpoints, resume and the
summaries read it — and TensorBoard and Weights & Biases when listed.

TensorBoard: event files under runs/<run>/tensorboard/<stage>/ (stage "sft" or "rl"), every numeric
value of a metrics.jsonl row as a scalar under the same name at that row's `step`. Each stage's
writer opens with `purge_step` at its first row's step: a resumed run, which cuts metrics.jsonl after
its checkpoint and appends, hides the cut steps' events, so TensorBoard shows each step once, as
metrics.jsonl does. wandb: one run
(project `trainer.wandb_project`, name `trainer.run_name`, files under runs/<run>/; WANDB_MODE=offline
works without a network), values logged as "<stage>/<name>" with the row's step as "<stage>/step".
A logger other than jsonl that fails is reported once and disabled: it never stops training.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from engine.metrics import MetricsLog

log = logging.getLogger("pathorl.loggers")
LOGGERS = ("jsonl", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}


class _TensorBoard:
    def __init__(self, run_dir: str):
        self.root = os.path.join(run_dir, "tensorboard")
        self.writers: dict[str, Any] = {}

    def write(self, record: dict[str, Any]) -> None:
        stage = record.get("stage", "rl")
        if stage not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[stage] = SummaryWriter(log_dir=os.path.join(self.root, stage),
                                                purge_step=int(record.get("step", 0)))
        writer = self.writers[stage]
        for name, value in _scalars(record).items():
            writer.add_scalar(name, value, global_step=int(record.get("step", 0)))
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class _Wandb:
    def __init__(self, run_dir: str, project: str, name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=project, name=name, dir=run_dir, config=config)

    def write(self, record: dict[str, Any]) -> None:
        stage = record.get("stage", "rl")
        self.run.log({f"{stage}/step": record.get("step", 0),
                      **{f"{stage}/{k}": v for k, v in _scalars(record).items()}})

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """Writes each metrics row to metrics.jsonl and to the other configured loggers."""

    def __init__(self, run_dir: str, loggers: list[str], config: dict[str, Any] | None = None,
                 wandb_project: str = "pathorl", run_name: str = ""):
        self.jsonl = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        self.others: dict[str, Any] = {}
        for name in loggers:
            if name == "jsonl":
                continue
            try:
                self.others[name] = (_TensorBoard(run_dir) if name == "tensorboard" else
                                     _Wandb(run_dir, wandb_project, run_name, config or {}))
            except Exception as e:
                self._disable(name, e)

    def _disable(self, name: str, error: Exception) -> None:
        self.others.pop(name, None)
        log.warning("logger %s failed (%s: %s); it is disabled for the rest of the run, metrics.jsonl is "
                    "unaffected", name, type(error).__name__, error)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for name, logger in list(self.others.items()):
            try:
                logger.write(record)
            except Exception as e:
                self._disable(name, e)

    def close(self) -> None:
        for name, logger in list(self.others.items()):
            try:
                logger.close()
            except Exception as e:
                self._disable(name, e)
