"""Rollout records: the msgpack wire format round-trips exactly (log-probs at float32), and the
on-disk log can be summarised, printed and exported for `python -m rewards check`; a rerun in the
same run folder keeps the earlier run's records apart."""

import json
import subprocess
import sys

import numpy as np
import pytest

from rollout.records import GroupResult, RolloutLog, Sample, from_record, pack, read, to_record, unpack


def _result(uid, n=2, error=None):
    rng = np.random.default_rng(len(uid))
    samples = [Sample(token_ids=[int(t) for t in rng.integers(0, 151000, 5 + k)],
                      logprobs=[float(x) for x in rng.normal(-2, 1, 5 + k)], finish_reason=("stop", "length")[k % 2])
               for k in range(0 if error else n)]
    return GroupResult(uid=uid, worker=1, prompt_token_ids=[151644, 8948, 198], samples=samples, error=error,
                       latency_s=0.25)


def test_wire_format_round_trip():
    results = [_result("row-1#1", 3), _result("row-2#2", error="ValueError: image too large")]
    back = [from_record(r) for r in unpack(pack([to_record(x) for x in results]))]
    for a, b in zip(results, back):
        assert (a.uid, a.worker, a.prompt_token_ids, a.error) == (b.uid, b.worker, b.prompt_token_ids, b.error)
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
        assert [s.finish_reason for s in a.samples] == [s.finish_reason for s in b.samples]
        for sa, sb in zip(a.samples, b.samples):  # float32 on the wire
            assert np.array_equal(np.float32(sa.logprobs), np.float32(sb.logprobs))
    with pytest.raises(ValueError, match="unsupported version"):
        from_record({**to_record(results[0]), "v": 99})


def test_log_inspect_and_export(tmp_path, tiny_model):
    log = RolloutLog(str(tmp_path / "rollouts"))
    row = {"id": "r1", "images": [], "question": "Stain?", "options": ["H&E", "IHC"], "answer": "B",
           "data_source": "t"}
    for step in (1, 2):
        rec = to_record(_result(f"r1#{step}", 2))
        rec.update(step=step, row_id="r1", images=[], row=row)
        for s, reward in zip(rec["samples"], (1.0, 0.0)):
            s.update(reward=reward, components={"accuracy": reward})
        log.write(step, [rec])
    assert [r["step"] for r in read(str(tmp_path / "rollouts"))] == [1, 2]
    assert [r["step"] for r in read(log.path(2))] == [2]

    def inspect(*args):
        return subprocess.run([sys.executable, "-m", "rollout.inspect", *args], capture_output=True, text=True,
                              check=True).stdout

    summary = inspect(str(tmp_path / "rollouts")).splitlines()
    assert summary[0].split()[:3] == ["step", "groups", "samples"] and len(summary) == 3
    assert summary[1].split()[:5] == ["1", "1", "2", "0", "0.500"]
    shown = inspect(log.path(1), "--samples", "1", "--tokenizer", tiny_model)
    assert "reward=1.0 accuracy=1.00" in shown
    inspect(str(tmp_path / "rollouts"), "--export", str(tmp_path / "out"), "--tokenizer", tiny_model)
    rows = [json.loads(x) for x in open(tmp_path / "out" / "rows.jsonl")]
    responses = [json.loads(x) for x in open(tmp_path / "out" / "responses.jsonl")]
    assert len(rows) == len(responses) == 4 and rows[0] == row
    assert responses[1]["truncated"] is True and isinstance(responses[0]["response"], str)


def test_rerun_under_same_name_archives_the_earlier_run(tmp_path):
    """A second run in the same folder starts a fresh metrics log (its summary must not mix two
    runs) and keeps the first run's metrics, rollouts and config intact under previous-<time>/."""
    from engine.metrics import MetricsLog
    from engine.checkpoint import archive_previous_run

    run = tmp_path / "demo"
    run.mkdir()
    assert archive_previous_run(str(run)) is None
    MetricsLog(str(run / "metrics.jsonl")).write({"step": 1, "reward/mean": 0.25})
    RolloutLog(str(run / "rollouts")).write(1, [{**to_record(_result("a")), "step": 1}])
    (run / "config.yaml").write_text("trainer: {steps: 1}\n")
    (run / "model.safetensors").write_text("checkpoint")

    dest = archive_previous_run(str(run))
    MetricsLog(str(run / "metrics.jsonl")).write({"step": 1, "reward/mean": 0.75})

    assert [json.loads(l)["reward/mean"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [0.75]
    assert [json.loads(l)["reward/mean"] for l in open(f"{dest}/metrics.jsonl")] == [0.25]
    assert [r["step"] for r in read(f"{dest}/rollouts")] == [1]
    assert open(f"{dest}/config.yaml").read() == "trainer: {steps: 1}\n"
    assert not (run / "rollouts").exists() and (run / "model.safetensors").read_text() == "checkpoint"
