"""The rollout pool on the real stack (Ray + two vLLM engines on the tiny model): groups stream back
as they finish, bad prompts become error records while the batch proceeds, DAPO dynamic sampling
never lets a zero-variance group through and carries surplus groups over, and a worker killed in
the middle of generation costs no prompt and duplicates none."""

import collections
import textwrap

import pytest
import ray
from transformers import AutoProcessor

from engine.config import load_config
from engine.data import PromptBuilder, PromptStream, load_rows
from engine.metrics import PhaseTimer
from engine.sampler import GroupSampler
from rewards import RewardRunner, RewardSpec
from rollout.pool import RolloutPool
from rollout.records import GroupRequest


@pytest.fixture(scope="module")
def pool(tiny_model):
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="pathorl-test-pool")
    p = RolloutPool(tiny_model, 2, sampling={"temperature": 1.0, "max_tokens": 16}, max_model_len=512,
                    env_vars={"OMP_NUM_THREADS": "1"})
    p.wait_ready()
    yield p
    p.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_model, demo_data):
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows, _ = load_rows(f"{demo_data}/val.jsonl")
    builder = PromptBuilder(processor, "You are a pathology expert.", 512)
    return [builder.build(r) for r in rows[:6]], processor


def _drain(pool):
    out = []
    while pool.outstanding:
        out.append(pool.results(timeout_s=300))
    return out


def test_streams_groups_and_reports_bad_prompts(pool, prompts):
    ps, _ = prompts
    requests = [GroupRequest(uid=f"long-{i}", prompt=p.text, images=p.images, n=3,
                             sampling={"max_tokens": 48, "ignore_eos": True}) for i, p in enumerate(ps[:4])]
    requests.append(GroupRequest(uid="short", prompt=ps[4].text, images=ps[4].images, n=3,
                                 sampling={"max_tokens": 2, "ignore_eos": True}))
    requests.append(GroupRequest(uid="too-long", prompt=ps[5].text + " word" * 600, images=ps[5].images, n=3))
    pool.submit(requests)
    batches = _drain(pool)
    results = {r.uid: r for batch in batches for r in batch}
    assert sorted(results) == sorted(r.uid for r in requests)
    # Streaming: the short group and the rejected one come back before the long groups are done.
    first = {r.uid for r in batches[0]}
    assert first & {"short", "too-long"} and not first >= {f"long-{i}" for i in range(4)}
    assert results["too-long"].samples == [] and "512" in results["too-long"].error  # names the limit
    for uid in [f"long-{i}" for i in range(4)]:
        r = results[uid]
        assert r.error is None and len(r.samples) == 3 and all(len(s.token_ids) == 48 for s in r.samples)
        assert all(s.finish_reason == "length" and len(s.logprobs) == 48 for s in r.samples)
        assert r.prompt_token_ids == ps[int(uid[-1])].prompt_ids  # token-in/token-out, image tokens expanded
    assert results["short"].error is None and all(len(s.token_ids) == 2 for s in results["short"].samples)


def test_dynamic_sampling_drops_zero_variance_and_carries_surplus(pool, tiny_model, demo_data, tmp_path):
    reward_file = tmp_path / "parity_reward.py"
    reward_file.write_text(textwrap.dedent('''
        def parity(sample):
            """Rows whose id ends in an even digit: every sample scores 1 (a zero-variance group).
            Other rows: the parity of the response's token ids, which varies across samples."""
            if int(sample.extra["id"][-1]) % 2 == 0:
                return 1.0
            return float(sum(sample.response_ids) % 2)
    '''))
    cfg = load_config("launch/configs/demo.yaml", [
        f"model.path={tiny_model}", f"data.train={demo_data}/train.jsonl", "rollout.group_size=4",
        "rollout.prompts_per_step=3", "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=6",
        f"reward.functions=[{{name: accuracy, fn: '{reward_file}:parity'}}]"])
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows, _ = load_rows(cfg.data.train)
    stream = PromptStream(rows, PromptBuilder(processor, cfg.data.system_prompt, 512), seed=1, skip_solved_epochs=1)
    with RewardRunner([RewardSpec("accuracy", f"{reward_file}:parity")], num_workers=1) as rewards:
        sampler = GroupSampler(cfg, pool, stream, rewards, processor.tokenizer)
        first = sampler.sample(PhaseTimer(), 1)
        carried = [g.result.uid for g in sampler.carry]
        second = sampler.sample(PhaseTimer(), 2)
    for step in (first, second):
        assert len(step.groups) == 3
        for g in step.groups:
            acc = g.components["accuracy"]
            assert len(set(acc)) > 1, f"zero-variance group {g.prompt.uid} reached the training set: {acc}"
    dropped = [g for g in first.seen + second.seen if len(set(g.components["accuracy"])) == 1]
    assert dropped and sampler.stats.groups_dropped == len(dropped)
    assert all(int(g.prompt.uid[-1]) % 2 == 0 or len(set(g.components["accuracy"])) == 1 for g in dropped)
    # Surplus qualified groups of step 1 are the first groups of step 2, not regenerated or lost.
    assert [g.result.uid for g in second.groups][:len(carried)] == carried[:3]
    assert all(g.step == 1 for g in second.groups[:len(carried)]) and all(g.step == 2 for g in second.seen)
    # Pass-rate-aware scheduling remembers exactly the zero-variance (all right / all wrong) prompts,
    # which are the dropped ones: they are skipped next epoch.
    assert set(stream._solved_until) == {g.prompt.uid for g in dropped}
    st = sampler.stats
    assert st.tokens_qualified + st.tokens_dropped == st.tokens_generated
    assert sampler.metrics()["dapo/filtered_frac"] == pytest.approx(st.tokens_dropped / st.tokens_generated)


def test_killed_worker_loses_and_duplicates_nothing(pool, prompts):
    ps, _ = prompts
    requests = [GroupRequest(uid=f"g{i}", prompt=ps[i % len(ps)].text, images=ps[i % len(ps)].images, n=2,
                             sampling={"max_tokens": 64, "ignore_eos": True}) for i in range(10)]
    pool.submit(requests)
    got = list(pool.results(timeout_s=300))
    # Mid-generation: kill the worker that still holds outstanding groups (the other may be done).
    victim = max(range(pool.num_workers), key=lambda i: len(pool._outstanding[i]))
    assert pool._outstanding[victim], "every group finished before the kill"
    ray.kill(pool.workers[victim])
    while pool.outstanding:
        got += pool.results(timeout_s=600)
    counts = collections.Counter(r.uid for r in got)
    assert sorted(counts) == sorted(r.uid for r in requests) and set(counts.values()) == {1}
    assert all(r.error is None and len(r.samples) == 2 for r in got)
    assert pool.restarts == 1
    pool.wait_ready()  # the restarted worker comes back and takes work again
    pool.submit([GroupRequest(uid=f"after{i}", prompt=ps[0].text, images=ps[0].images, n=1) for i in range(4)])
    after = [r for batch in _drain(pool) for r in batch]
    assert len(after) == 4 and {r.worker for r in after} == {0, 1}
