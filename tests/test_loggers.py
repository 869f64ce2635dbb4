"""Metrics destinations and plots: TensorBoard event files read back with tensorboard's own reader equal
metrics.jsonl (stages apart); a wandb run in offline mode (no network) holds every row under its
stage's names, in the configured project and run name; a failing logger is reported once and disabled while metrics.jsonl
goes on; a logger whose package is missing, or a list without jsonl, is refused at start-up."""

import glob
import importlib.util
import json
import logging
import struct
import time

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


def test_a_resumed_run_replaces_the_cut_steps_in_tensorboard(tmp_path):
    """Resume cuts metrics.jsonl after the checkpoint's step and appends: TensorBoard shows the
    rewritten steps once, with the new values, and nothing of the cut rows (purge_step)."""
    log = RunLog(str(tmp_path), ["jsonl", "tensorboard"])
    for step in (1, 2, 3, 4):
        log.write({"stage": "rl", "step": step, "reward/mean": 0.1 * step, "eval/greedy_accuracy": 0.5})
    log.close()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]))
    log = RunLog(str(tmp_path), ["jsonl", "tensorboard"])
    for step in (3, 4, 5):
        log.write({"stage": "rl", "step": step, "reward/mean": 1.0 + step})
    log.close()
    assert_tensorboard_equals_jsonl(tmp_path)
    assert read_tensorboard(tmp_path / "tensorboard" / "rl")["eval/greedy_accuracy"] == {1: 0.5, 2: 0.5}


def wandb_records(path):
    """The protobuf Records of a wandb run file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing in 32 KiB blocks — per chunk a CRC (4 bytes), a length (2, little-endian) and a
    type (1: full record, 2/3/4: its first/middle/last piece) — as wandb's own datastore writes it."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_every_row(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"stage": "sft", "step": 1, "sft/nll": 2.5},
            {"stage": "rl", "step": 1, "reward/mean": 0.25, "checkpoint": "runs/x/hf", "entropy": None},
            {"stage": "rl", "step": 2, "reward/mean": 0.75, "kl": 1e-3}]
    log = RunLog(str(tmp_path), ["jsonl", "wandb"], {"learner": {"lr": 1e-3}}, "pathorl-test", "demo-run")
    for row in rows:
        log.write(row)
    log.close()
    assert log.others, "the wandb logger was disabled"
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb's core process writes the run file on its own time after finish(): wait for its exit record.
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, f"{path} has no exit record 60 s after finish()"
        time.sleep(0.2)
    records = wandb_records(path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("pathorl-test", "demo-run")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item
                if not (item.key or "/".join(item.nested_key)).startswith("_")}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert history == [{"sft/step": 1, "sft/sft/nll": 2.5}, {"rl/step": 1, "rl/reward/mean": 0.25},
                       {"rl/step": 2, "rl/reward/mean": 0.75, "rl/kl": 1e-3}]


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
