"""One-step-off asynchronous rollouts (`rollout.max_staleness: 1`) on the real stack (Ray, vLLM,
DeepSpeed, tiny model, no SFT, so the KL reference is the initial policy θ0).

Three steps: step 1 trains what θ0 generated and, during its update, the engines generate step 2's
groups, still on θ0 — the sync to θ1 waits for them. So the engine's log-probs of every sample trained
at step 2 equal the reference's (θ0) to 1e-4, while step 3's (generated on θ1, during step 2's update)
do not; staleness is 0, 1, 1 and the PPO π_old of stale samples is left to the learner (decoupled PPO
with the engine's log-probs in the truncated importance weight). The ledger settles every group once.
Then a run resumed from step 2's checkpoint, which holds the prefetched groups, trains step 3 exactly
as the uninterrupted run did. And the bookkeeping of a carried group that would train two updates
after its policy: dropped, counted, and settled in the ledger once.
"""

import collections
import json

import pytest

from engine import checkpoint, ledger
from engine.config import load_config
from engine.data import Prompt
from engine.sampler import GroupSampler, ScoredGroup, StepRollout
from engine.trainer import Trainer
from rollout.records import GroupResult


def _config(tiny_model, demo_data, tmp_path, *extra):
    return load_config("launch/configs/demo.yaml", [
        f"model.path={tiny_model}", f"data.train={demo_data}/train.jsonl", "data.val=null",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=async", "trainer.steps=3", "trainer.eval_every=0",
        "trainer.save_every=2", "sft.steps=0", "rollout.prompts_per_step=2", "rollout.group_size=3",
        "rollout.max_new_tokens=8", "rollout.cpu_threads=1", "learner.torch_threads=1", "learner.lr=1e-2",
        "algorithm.entropy_coef=0.1", "trainer.loggers=[jsonl]", "rollout.max_staleness=1", "algorithm.tis_cap=2.0",
        *extra])


def _train(cfg):
    """Runs the trainer; returns the sequences of each step's update, in order."""
    trainer = Trainer(cfg)
    updates = []
    real_update = trainer.learners.update

    def update(mini_batches, images, lr=None):
        updates.append([s for mb in mini_batches for s in mb])
        return real_update(mini_batches, images, lr)

    trainer.learners.update = update
    try:
        trainer.fit()
    finally:
        trainer.close()
    return updates


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _gap(seqs):
    """Largest |engine log-prob − reference log-prob| over the sequences' response tokens."""
    return max(abs(a - b) for s in seqs for a, b in zip(s.rollout_logprobs, s.ref_logprobs))


def test_one_step_off_generates_on_the_previous_weights_and_resumes(ray_session, tiny_model, demo_data, tmp_path):
    run = tmp_path / "async"
    updates = _train(_config(tiny_model, demo_data, tmp_path))
    assert len(updates) == 3 and all(len(u) == 6 for u in updates)
    assert _gap(updates[0]) < 1e-4, "step 1 was generated on θ0, the reference"
    assert _gap(updates[1]) < 1e-4, "step 2's groups were not generated (entirely) on θ0 during step 1's update"
    assert _gap(updates[2]) > 1e-3, "step 3's groups were generated before the engines took θ1"
    assert all(s.old_logprobs is None for u in updates[1:] for s in u)

    metrics = {r["step"]: r for r in _rows(run / "metrics.jsonl") if r["stage"] == "rl"}
    assert [metrics[k]["staleness/max"] for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert [metrics[k]["async/prefetched_groups"] for k in (1, 2, 3)] == [0.0, 2.0, 2.0]
    assert all(metrics[k]["timing/prefetch_wait"] >= 0 for k in (1, 2, 3))

    ledger = _rows(run / "ledger.jsonl")
    settled = collections.Counter((e["uid"], e["epoch"]) for e in ledger if e["status"] != "carried")
    assert set(settled.values()) == {1} and len(settled) == 6
    assert collections.Counter(e["step"] for e in ledger if e["status"] == "trained") == {1: 2, 2: 2, 3: 2}

    saved = checkpoint.load_state(str(run / "checkpoints" / "step_2"))
    assert len(saved["sampler"]["ahead"]) == 2 and saved["sampler"]["ahead_step"] == 2
    step3 = metrics[3]
    resumed = _train(_config(tiny_model, demo_data, tmp_path, f"trainer.resume={run}/checkpoints/step_2"))
    assert len(resumed) == 1
    assert [s.response_ids for s in resumed[0]] == [s.response_ids for s in updates[2]]
    again = {r["step"]: r for r in _rows(run / "metrics.jsonl") if r["stage"] == "rl"}
    assert sorted(again) == [1, 2, 3] and _rows(run / "ledger.jsonl") == ledger
    for key in ("reward/mean", "response_length/mean", "staleness/max"):
        assert again[3][key] == step3[key], key
    for key in ("loss", "kl", "grad_norm", "entropy"):
        assert again[3][key] == pytest.approx(step3[key], rel=1e-5, abs=1e-7), key


def test_a_group_older_than_one_update_is_dropped_and_settled_once():
    cfg = load_config(None, ["rollout.max_staleness=1", "algorithm.tis_cap=2", "rollout.prompts_per_step=2"])
    sampler = GroupSampler(cfg, pool=None, stream=None, rewards=None, tokenizer=None)

    def group(uid, step):
        return ScoredGroup(Prompt(uid, {}, "", [], [], None, None), GroupResult(uid, 0), [], [1.0], {}, step=step)

    # At step 2: "a" was carried from step 1 and is left over; "c" (prefetched during step 1) and
    # "b" (generated now) qualified beyond the step's two groups.
    a, b, c = group("a", 1), group("b", 2), group("c", 1)
    sampler.carry, sampler._step = [a, c, b], 2
    out = StepRollout(groups=[group("t1", 1), group("t2", 2)], seen=[c, b], carried=[c, b])
    out.seen += out.groups
    sampler._expire(out)
    assert sampler.carry == [b] and out.carried == [b] and out.expired == [a]
    assert sampler.stats.groups_expired == 2
    lines = {e["uid"]: e["status"] for e in ledger.step_entries(2, out, [], trained=True)}
    assert lines == {"t1": "trained", "t2": "trained", "a": "dropped", "c": "dropped", "b": "carried"}
