"""Runs that survive a crash, on the real stack (Ray + vLLM + DeepSpeed, tiny model, `launch/rl.py`):

(a) GRPO, 4 rows, 2 prompts a step, checkpoints every 2 steps: a run killed (SIGKILL to the driver
    and every process under it) after step 4's checkpoint — exactly at an epoch boundary — and
    resumed with the same command trains on to step 6: its ledger equals the uninterrupted run's, its
    step 5–6 metrics match (rewards and lengths exactly, losses to 1e-5), and so do its final weights;
(b) DAPO with surplus groups carried over, killed during the step after a checkpoint: the resumed
    run trains the checkpoint's carried groups, and the ledger shows every (row, epoch) settled once;
(c) a checkpoint cut short is skipped by `trainer.resume=auto` with a message naming it, and refused
    when named explicitly.
"""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint

ROOT = Path(__file__).resolve().parents[1]
REWARD = '''
def alternating(samples):
    seen, out = {}, []
    for s in samples:
        seen[s.extra["id"]] = seen.get(s.extra["id"], 0) + 1
        out.append(float(seen[s.extra["id"]] % 2))
    return out
'''
FINAL = {"trained", "dropped", "failed", "skipped"}


def _command(tmp_path, config, name, *overrides):
    return [sys.executable, "launch/rl.py", "--config", config, f"trainer.output_dir={tmp_path}",
            f"trainer.run_name={name}", "sft.steps=2", "rollout.group_seeds=true", *overrides]


def _run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _run_and_kill(cmd, metrics, step, timeout=900):
    """Starts the run and SIGKILLs the driver and all its descendants (Ray, vLLM, DeepSpeed) as soon
    as metrics.jsonl holds the RL row of `step` (its checkpoint is written before that row)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if metrics.exists() and any(r.get("stage") == "rl" and r["step"] == step for r in _rows(metrics)):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            raise AssertionError(f"step {step} never came")
    finally:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=30)


def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _data(tmp_path, demo_data, n):
    rows = [json.loads(line) for line in open(f"{demo_data}/train.jsonl")][:n]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**r, "id": f"r{i}", "images": [os.path.join(demo_data, p) for p in r["images"]]})
                            + "\n" for i, r in enumerate(rows)))
    (tmp_path / "reward.py").write_text(REWARD)
    return path


def _settled_once(ledger, pending=frozenset()):
    """Every (row, epoch) has at most one final status, and a carried group is trained later unless
    it is still `pending` (carried by the run's last checkpoint, for a run that continues)."""
    final = collections.Counter((e["uid"], e["epoch"]) for e in ledger if e["status"] in FINAL)
    assert final and set(final.values()) == {1}, [k for k, v in final.items() if v != 1]
    for e in ledger:
        if e["status"] == "carried" and (e["uid"], e["epoch"]) not in pending:
            assert any(t["uid"] == e["uid"] and t["epoch"] == e["epoch"] and t["status"] == "trained"
                       and t["step"] > e["step"] for t in ledger), f"carried group {e['uid']} never trained"
    assert not pending & set(final), "a group still carried also has a final status"


def test_crash_and_resume_matches_the_uninterrupted_run(tmp_path, tiny_model, demo_data):
    rows = _data(tmp_path, demo_data, 4)
    args = ["launch/configs/patho_r1_grpo_tiny.yaml"]
    settings = [f"data.train={rows}", "data.val=null", "rollout.prompts_per_step=2", "learner.mini_batches=1",
                "trainer.steps=6", "trainer.save_every=2", "rollout.max_new_tokens=24"]
    _run(_command(tmp_path, *args, "whole", *settings))
    crashed = _command(tmp_path, *args, "crashed", *settings)
    _run_and_kill(crashed, tmp_path / "crashed" / "metrics.jsonl", step=4)
    assert checkpoint.latest(str(tmp_path / "crashed")).endswith("step_4")
    proc = _run(crashed)
    assert "resumed from" in proc.stderr and "continuing at step 5" in proc.stderr

    whole, resumed = tmp_path / "whole", tmp_path / "crashed"
    assert _rows(whole / "ledger.jsonl") == _rows(resumed / "ledger.jsonl")
    epochs = {e["step"]: e["epoch"] for e in _rows(whole / "ledger.jsonl")}
    assert epochs[4] == 1 and epochs[5] == 2, "step 4's checkpoint is not at an epoch boundary"
    _settled_once(_rows(resumed / "ledger.jsonl"))
    a = {r["step"]: r for r in _rows(whole / "metrics.jsonl") if r["stage"] == "rl"}
    b = {r["step"]: r for r in _rows(resumed / "metrics.jsonl") if r["stage"] == "rl"}
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and not list(resumed.glob("previous-*"))
    for step in (5, 6):
        for key in ("reward/mean", "reward/accuracy", "response_length/mean", "data/epoch"):
            assert b[step][key] == a[step][key], (step, key)
        for key in ("loss", "kl", "grad_norm", "entropy"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    # The rollout logs hold one attempt per step: the killed attempt's step-5 records are set aside.
    from rollout.records import read

    def uids(run):
        return sorted((r["step"], r["row_id"]) for r in read(str(run / "rollouts")))
    assert uids(resumed) == uids(whole)
    wa = load_file(str(whole / "checkpoints" / "step_6" / "hf" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / "step_6" / "hf" / "model.safetensors"))
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-6, f"final weights differ by {worst:.3g}"
    moved = max((wa[k] - load_file(f"{tiny_model}/model.safetensors")[k]).abs().max().item() for k in wa)
    assert moved > 1e-3


def test_crash_mid_step_with_carried_groups(tmp_path, tiny_model, demo_data):
    rows = _data(tmp_path, demo_data, 6)
    cmd = _command(tmp_path, "launch/configs/patho_r1_dapo_tiny.yaml", "run", f"data.train={rows}", "data.val=null",
                   "rollout.prompts_per_step=2", "learner.mini_batches=1", "trainer.steps=4", "trainer.save_every=1",
                   f"reward.functions=[{{name: accuracy, fn: {tmp_path}/reward.py:alternating}}]")
    _run_and_kill(cmd, tmp_path / "run" / "metrics.jsonl", step=1)
    saved = checkpoint.latest(str(tmp_path / "run"))
    state = checkpoint.load_state(saved)
    carried_at_save = {(c["uid"], c["epoch"]) for c in state["sampler"]["carry"]}
    proc = _run(cmd)
    assert f"continuing at step {state['step'] + 1}" in proc.stderr
    ledger = _rows(tmp_path / "run" / "ledger.jsonl")
    assert [e["step"] for e in ledger] == sorted(e["step"] for e in ledger) and ledger[-1]["step"] == 4
    last = checkpoint.load_state(checkpoint.latest(str(tmp_path / "run")))
    assert last["step"] == 4
    _settled_once(ledger, pending={(c["uid"], c["epoch"]) for c in last["sampler"]["carry"]})
    trained_after = {(e["uid"], e["epoch"]) for e in ledger if e["status"] == "trained" and e["step"] > state["step"]}
    assert carried_at_save <= trained_after
    rl = [r for r in _rows(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]


def _fake_checkpoint(run_dir, step, payload=b"x" * 100, finished=False):
    tmp = checkpoint.begin(str(run_dir), step)
    os.makedirs(os.path.join(tmp, "learner"))
    with open(os.path.join(tmp, "learner", "weights.bin"), "wb") as f:
        f.write(payload)
    return checkpoint.commit(tmp, {"step": step, "config": {}, "finished": finished})


def test_cut_short_checkpoints_are_skipped_or_refused(tmp_path, caplog):
    run = tmp_path / "run"
    _fake_checkpoint(run, 2)
    truncated = _fake_checkpoint(run, 4)
    with open(os.path.join(truncated, "learner", "weights.bin"), "wb") as f:
        f.write(b"x" * 10)
    unmarked = _fake_checkpoint(run, 6)
    os.remove(os.path.join(unmarked, checkpoint.MARKER))
    os.makedirs(checkpoint.path_for(str(run), 8) + ".tmp")
    with caplog.at_level("WARNING"):
        assert checkpoint.latest(str(run)) == checkpoint.path_for(str(run), 2)
    assert "step_6 has no COMPLETE.json" in caplog.text and "weights.bin is 10 bytes" in caplog.text
    assert checkpoint.resolve("auto", str(run), steps=10) == checkpoint.path_for(str(run), 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"weights\.bin is 10 bytes, COMPLETE\.json says 100"):
        checkpoint.resolve(truncated, str(run), steps=10)
    with pytest.raises(checkpoint.CheckpointError, match="has no COMPLETE.json"):
        checkpoint.resolve(unmarked, str(run), steps=10)
    with pytest.raises(checkpoint.CheckpointError, match="nothing is left to train"):
        checkpoint.resolve(checkpoint.path_for(str(run), 2), str(run), steps=2)
    assert checkpoint.resolve("auto", str(run), steps=2) is None   # reached trainer.steps: start afresh
    finished = _fake_checkpoint(run, 10, finished=True)
    assert checkpoint.resolve("auto", str(run), steps=20) is None  # a finished run is never resumed by auto
    assert checkpoint.resolve(finished, str(run), steps=20) == finished   # but continues when named
    shutil.rmtree(finished)
    removed = checkpoint.prune(str(run), keep_last=1)
    assert checkpoint.path_for(str(run), 2) not in removed and any(p.endswith("step_8.tmp") for p in removed)
    assert torch.load(os.path.join(checkpoint.path_for(str(run), 2), checkpoint.STATE))["step"] == 2


def test_a_checkpoint_that_does_not_fit_the_run_is_refused(tmp_path):
    """Another model or group size, or a ledger that is not the checkpoint's: refused, naming the
    fields or the file; a safe change (steps, lr) is allowed."""
    from engine.config import load_config, to_dict

    run = tmp_path / "run"
    saved = to_dict(load_config("launch/configs/demo.yaml"))
    tmp = checkpoint.begin(str(run), 2)
    path = checkpoint.commit(tmp, {"step": 2, "config": saved, "uses_reference": True, "ledger_lines": 2})
    (run / "ledger.jsonl").write_text("".join(json.dumps({"step": s, "uid": f"r{s}", "epoch": 0, "status": "trained"})
                                              + "\n" for s in (1, 2, 3)))
    changed = to_dict(load_config("launch/configs/demo.yaml", ["trainer.steps=90", "learner.lr=1e-4"]))
    assert checkpoint.check_continuation(path, changed, True, str(run))["step"] == 2   # 3rd line is past step 2
    other = to_dict(load_config("launch/configs/demo.yaml", ["model.path=/models/other", "rollout.group_size=4"]))
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.path: checkpoint 'artifacts/tiny-qwen2\.5-vl', "
                                                          r"now '/models/other'(.|\n)*rollout\.group_size"):
        checkpoint.check_continuation(path, other, True, str(run))
    # LoRA compares by what the settings mean: off is off (rank 0 or null, other fields aside),
    # α null is 2·rank, targets are a set; a real change of the adapters is refused.
    off = ["model.lora.rank=null", "model.lora.target_modules=[q_proj]"]
    assert checkpoint.check_continuation(path, to_dict(load_config("launch/configs/demo.yaml", off)), True,
                                         str(run))["step"] == 2
    lora = ["model.lora.rank=4", "model.lora.target_modules=[q_proj,v_proj]"]
    tmp = checkpoint.begin(str(run), 4)
    lora_path = checkpoint.commit(tmp, {"step": 2, "config": to_dict(load_config("launch/configs/demo.yaml", lora)),
                                        "uses_reference": False, "ledger_lines": 2})
    same = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.target_modules=[v_proj,q_proj]", "model.lora.dropout=0.1",
            "algorithm.kl_loss_coef=0.01"]  # KL on: a LoRA policy's reference is its adapters-off base
    assert checkpoint.check_continuation(lora_path, to_dict(load_config("launch/configs/demo.yaml", same)), True,
                                         str(run))["step"] == 2
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.lora: checkpoint \{'rank': 4"):
        checkpoint.check_continuation(lora_path, to_dict(load_config("launch/configs/demo.yaml", lora[:1])), True,
                                      str(run))
    (run / "ledger.jsonl").write_text('{"step": 1, "uid": "r1", "epoch": 0, "status": "trained"}\n')
    with pytest.raises(checkpoint.CheckpointError, match=r"ledger\.jsonl holds 1 lines up to step 2, the checkpoint "
                                                          r".* recorded 2"):
        checkpoint.check_continuation(path, changed, True, str(run))


def test_a_rewind_sets_later_checkpoints_aside_and_a_crash_before_metrics_is_archived(tmp_path):
    """Resuming from step 2 by path while steps 4 and 6 exist moves those, the rollout logs of steps
    3-6 and copies of the records as they were aside, so `auto` never picks them again and nothing is lost; a run that left only a ledger
    (a crash before its first metrics row) is archived by the next fresh start; the final export is
    the last checkpoint's hf folder, whole."""
    from engine.config import load_config, to_dict

    run = tmp_path / "run"
    config = to_dict(load_config("launch/configs/demo.yaml"))
    for step in (2, 4, 6):
        tmp = checkpoint.begin(str(run), step)
        os.makedirs(os.path.join(tmp, "hf"))
        with open(os.path.join(tmp, "hf", "model.safetensors"), "w") as f:
            f.write(f"weights of step {step}")
        checkpoint.commit(tmp, {"step": step, "config": config, "uses_reference": True, "ledger_lines": step,
                                "record": {"stage": "rl", "step": step}})
    rows = "".join(json.dumps({"stage": "rl", "step": s, "uid": f"r{s}", "epoch": 0, "status": "trained"}) + "\n"
                   for s in range(1, 7))
    (run / "ledger.jsonl").write_text(rows)
    (run / "metrics.jsonl").write_text(rows)
    (run / "rollouts").mkdir()
    for step in range(1, 7):
        (run / "rollouts" / f"step_{step:06d}.msgpack").write_bytes(b"records")
    path, _ = checkpoint.open_run(str(run), config, checkpoint.path_for(str(run), 2), 10, True, "rl")
    assert path == checkpoint.path_for(str(run), 2) and checkpoint.latest(str(run)) == path
    (aside,) = run.glob("abandoned-*")
    assert sorted(os.listdir(aside / "checkpoints")) == ["step_4", "step_6"]
    assert sorted(os.listdir(run / "rollouts")) == ["step_000001.msgpack", "step_000002.msgpack"]
    assert len(os.listdir(aside / "rollouts")) == 4
    assert (aside / "ledger.jsonl").read_text() == rows and len(_rows(run / "ledger.jsonl")) == 2
    assert checkpoint.export_final(str(run), 2) == str(run / "hf")
    assert (run / "hf" / "model.safetensors").read_text() == "weights of step 2" and not (run / "hf.tmp").exists()

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    first_line = rows.splitlines(keepends=True)[0]
    (crashed / "ledger.jsonl").write_text(first_line)
    (crashed / "config.yaml").write_text("x: 1\n")
    checkpoint.open_run(str(crashed), config, "auto", 10, True, "rl")
    (previous,) = crashed.glob("previous-*")
    assert (previous / "ledger.jsonl").read_text() == first_line and not (crashed / "ledger.jsonl").exists()
