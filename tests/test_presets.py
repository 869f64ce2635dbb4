"""Every shipped `*_tiny.yaml` preset runs through `launch/rl.py` on the real stack (local Ray, vLLM,
DeepSpeed, reward workers), a few steps each, so a preset can never ship broken again; the DAPO
preset is also driven into the two states that broke or biased it:

- a step with one qualified group against learner.mini_batches=2 (it crashed): it trains on the one
  mini-batch it has;
- surplus groups carried to the next step (they trained with ratio 1): the carried step trains with
  the generating policy's log-probs (ratio != 1, staleness 1) while an on-policy step has ratio 1 —
  on two-image rows, so multi-image prompts go through rollout, SFT, learner and eval.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Accuracy that varies inside a group (alternating over a row's samples) only for rows listed in
# `varying` (all rows when None); constant 0 elsewhere, so dynamic sampling drops those groups.
REWARD = '''
def alternating(samples, varying=None):
    seen, out = {}, []
    for s in samples:
        row = s.extra["id"]
        seen[row] = seen.get(row, 0) + 1
        out.append(float(seen[row] % 2) if varying is None or row in varying else 0.0)
    return out
'''


def _run(tmp_path, config, *overrides):
    proc = subprocess.run(
        [sys.executable, "launch/rl.py", "--config", config, f"trainer.output_dir={tmp_path}", "trainer.run_name=run",
         "trainer.steps=2", "sft.steps=2", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    return [r for r in records if r["stage"] == "rl"]


def _rows(tmp_path, demo_data, n, images_per_row=1):
    rows = [json.loads(line) for line in open(f"{demo_data}/train.jsonl")][: n * images_per_row: images_per_row]
    pool = [json.loads(line)["images"][0] for line in open(f"{demo_data}/train.jsonl")]
    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            images = [os.path.join(demo_data, p) for p in pool[i * images_per_row:(i + 1) * images_per_row]]
            f.write(json.dumps({**row, "id": f"r{i}", "images": images}) + "\n")
    (tmp_path / "reward.py").write_text(REWARD)
    return path


def test_patho_r1_grpo_tiny_with_truncated_responses_masked(tmp_path, tiny_model, demo_data):
    # A short SFT target so some responses end before the 12-token limit and some do not.
    rl = _run(tmp_path, "launch/configs/patho_r1_grpo_tiny.yaml", "algorithm.mask_truncated=true",
              "rollout.max_new_tokens=12", "sft.steps=10", "sft.response_template=<answer>{answer}</answer>")
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:
        samples = r["rollout/groups"] * 8
        assert r["reward/errors"] == 0 and 0 < r["response_length/truncated_frac"] < 1
        assert r["learner/sequences"] == pytest.approx(samples * (1 - r["response_length/truncated_frac"]))
        assert r["learner/mini_batches"] == 2 and r["kl"] >= 0


def test_pathreasoner_grpo_tiny(tmp_path, tiny_model, demo_data):
    rl = _run(tmp_path, "launch/configs/pathreasoner_grpo_tiny.yaml")
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:
        assert r["kl_reward/mean"] == pytest.approx(r["kl_reward/mean"])  # finite: k1 KL in the reward
        assert {"reward/format", "reward/semantic", "reward/entity", "loss"} <= set(r)


def test_patho_r1_dapo_tiny_with_one_qualified_group(tmp_path, tiny_model, demo_data):
    rows = _rows(tmp_path, demo_data, 4)
    rl = _run(tmp_path, "launch/configs/patho_r1_dapo_tiny.yaml", f"data.train={rows}", "data.val=null",
              "algorithm.max_sampling_rounds=1", "rollout.prompts_per_step=4",
              f"reward.functions=[{{name: accuracy, fn: {tmp_path}/reward.py:alternating, kwargs: {{varying: [r0]}}}}]")
    for r in rl:
        assert r["dapo/train_groups"] == 1 and r["learner/mini_batches"] == 1 and "loss" in r
    assert rl[-1]["dapo/cap_hits"] == 2


def test_patho_r1_dapo_tiny_carried_groups_and_two_image_rows(tmp_path, tiny_model, demo_data):
    rows = _rows(tmp_path, demo_data, 4, images_per_row=2)
    rl = _run(tmp_path, "launch/configs/patho_r1_dapo_tiny.yaml", f"data.train={rows}", f"data.val={rows}",
              "data.max_images_per_prompt=2", "rollout.prompts_per_step=2", "learner.mini_batches=1",
              "trainer.eval_max_rows=2", f"reward.functions=[{{name: accuracy, fn: {tmp_path}/reward.py:alternating}}]")
    first, second = rl
    # step 1 keeps 2 of the 4 groups it generated and carries the other 2 to step 2
    assert first["dapo/groups_carried"] == 2 and first["staleness/max"] == 0
    assert first["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert second["staleness/max"] == 1 and abs(second["ratio/mean"] - 1.0) > 1e-6
    for r in rl:
        assert r["rollout/errors"] == 0 and r["data/skipped"] == 0
    assert first["mismatch/abs_logprob_diff"] < 1e-3, "two-image prompts: learner and vLLM disagree"
    assert second["eval/rows"] == 2
