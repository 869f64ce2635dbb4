"""Metrics destinations and plots: TensorBoard event files read back with tensorboard's own reader equal
metrics.jsonl (stages apart); a failing logger is reported once and disabled while metrics.jsonl
goes on; a logger whose package is missing, or a list without jsonl, is refused at start-up."""

import importlib.util
import json
import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.config import ConfigError, load_config
from engine.loggers import RunLog
from engine.preflight import logger_problems


def read_tensorboard(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_tensorboard_equals_jsonl(run_dir):
    """Every numeric value of every metrics.jsonl row is the scalar of the same name at that step, in
    the row's stage folder (float32 in the event file)."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    for stage in {r["stage"] for r in rows}:
        scalars = read_tensorboard(run_dir / "tensorboard" / stage)
        count = 0
        for row in rows:
            if row["stage"] != stage:
                continue
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    assert scalars[key][row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (stage, key)
                    count += 1
        assert count == sum(len(v) for v in scalars.values()), "event files hold values metrics.jsonl does not"


def test_tensorboard_equals_jsonl(tmp_path):
    log = RunLog(str(tmp_path), ["jsonl", "tensorboard"])
    log.write({"stage": "sft", "step": 1, "sft/nll": 2.5, "timing/update": 0.125})
    log.write({"stage": "sft", "step": 2, "sft/nll": 1.25, "timing/update": 0.5})
    log.write({"stage": "rl", "step": 0, "eval/greedy_accuracy": 0.25})
    log.write({"stage": "rl", "step": 1, "reward/mean": 0.3333333, "kl": 1e-7, "checkpoint": "runs/x/hf",
               "entropy": None})
    log.close()
    assert_tensorboard_equals_jsonl(tmp_path)


def test_a_failing_logger_is_reported_once_and_disabled(tmp_path, caplog):
    log = RunLog(str(tmp_path), ["jsonl", "tensorboard"])
    log.write({"stage": "rl", "step": 1, "reward/mean": 0.5})

    def broken(record):
        raise OSError("disk full")

    log.others["tensorboard"].write = broken
    with caplog.at_level(logging.WARNING):
        for step in (2, 3):
            log.write({"stage": "rl", "step": step, "reward/mean": 0.5})
    log.close()
    warnings = [r.getMessage() for r in caplog.records if "logger tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_bad_logger_lists_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="trainer.loggers must include 'jsonl'"):
        load_config(None, ["trainer.loggers=[tensorboard]"])
    with pytest.raises(ConfigError, match="'mlflow'"):
        load_config(None, ["trainer.loggers=[jsonl, mlflow]"])
    assert logger_problems(["jsonl", "tensorboard"]) == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert logger_problems(["jsonl", "wandb"]) == [
        "trainer.loggers lists wandb, but the wandb package is not installed (pip install wandb, or remove it "
        "from trainer.loggers)"]


def test_plots_of_several_runs(tmp_path):
    from engine.plots import plot_runs

    for name, dynamic in (("a", False), ("b", True)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"stage": "sft", "step": 1, "sft/nll": 1.0}, {"stage": "rl", "step": 0, "eval/greedy_accuracy": 0.2}]
        for step in range(1, 6):
            row = {"stage": "rl", "step": step, "reward/mean": 0.1 * step, "reward/accuracy": 0.1 * step,
                   "response_length/mean": 20.0, "kl": 0.01, "entropy": 0.5, "clipfrac": 0.0,
                   "timing/rollout": 1.0, "timing/update": 2.0, "timing/step": 3.0}
            if dynamic:
                row.update({"dapo/yield": 0.9, "dapo/filtered_frac": 0.3})
            rows.append(row)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "plots"))
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["accuracy.png", "clipfrac.png", "dynamic_sampling.png", "entropy.png", "kl.png",
                     "response_length.png", "reward.png", "step_time_a.png", "step_time_b.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and len(f.read()) > 5000
