"""The update must not depend on how a step is split: one step of 8 sequences as 1 micro-batch of 8,
as 4 micro-batches of 2, on 2 data-parallel ranks (two gloo processes under DeepSpeed ZeRO-2) in
token-budget micro-batches (learner.max_tokens_per_micro_batch), and with or without the shared
prompt prefix (learner.shared_prefix) must give the same parameters. This is the bug verl #5625 / OpenRLHF #1249 describe: a loss
normalised per micro-batch or per rank changes the gradient with the split."""

import pytest
import ray
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from engine.config import load_config
from engine.data import PromptBuilder, load_rows
from engine.learner import Sequence
from engine.learner_group import LearnerGroup, split_across_ranks, split_mini_batches


def _step(tiny_model, demo_data, loss_agg, ranks, micro, max_tokens=0, shared=True):
    cfg = load_config("launch/configs/demo.yaml", [
        f"model.path={tiny_model}", f"learner.num_ranks={ranks}", f"learner.micro_batch_size={micro}",
        f"learner.max_tokens_per_micro_batch={max_tokens}", f"learner.shared_prefix={shared}",
        "learner.lr=1e-3", "learner.torch_threads=1", f"algorithm.loss_agg={loss_agg}", "algorithm.kl_loss_coef=0",
        "rollout.max_new_tokens=12", "rollout.temperature=1.0"])
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows, _ = load_rows(f"{demo_data}/val.jsonl")
    builder = PromptBuilder(processor, cfg.data.system_prompt, 512)
    prompts = [builder.build(r) for r in rows[:2]]
    images = [(p.pixel_values, p.image_grid_thw) for p in prompts]
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(8):  # responses of different lengths: per-micro-batch normalisation would show
        n = 3 + (5 * i) % 10
        seqs.append(Sequence(prompt_ids=prompts[i % 2].prompt_ids, image=i % 2,
                             response_ids=torch.randint(0, 151000, (n,), generator=g).tolist(),
                             advantage=float(torch.randn((), generator=g)),
                             rollout_logprobs=(-10 - torch.rand(n, generator=g)).tolist()))
    learners = LearnerGroup(cfg)
    learners.wait_ready()
    try:
        stats = learners.update([seqs], images)
        weights = ray.get(learners.weight_source.export_weights.remote())
    finally:
        learners.shutdown()
    return weights, stats


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_same_parameters_whatever_the_split(ray_session, tiny_model, demo_data, loss_agg):
    base, base_stats = _step(tiny_model, demo_data, loss_agg, ranks=1, micro=8)
    # Shared-prefix passes (the default) against: 1 rank x micro-batches of 2 (each group cut in two);
    # 2 ranks x token-budget micro-batches (a 144-token prompt and its responses in packed rows of at
    # most 160 tokens: one rank's group is cut in two, the other rank runs an empty micro-batch); and unshared passes, in token-budget micro-batches (sequences of
    # ~170 tokens: two per micro-batch of at most 400 padded tokens).
    for ranks, micro, max_tokens, shared in [(1, 2, 0, True), (2, 8, 160, True), (1, 8, 400, False)]:
        weights, stats = _step(tiny_model, demo_data, loss_agg, ranks, micro, max_tokens, shared)
        # Adam's first step is ~lr * sign(g): the few parameters whose gradient is near Adam's eps
        # (1e-8) move by a fraction of lr that float summation order shifts (up to ~1e-5 seen); a loss
        # normalised per micro-batch or per rank instead moves most parameters by ~lr (1e-3).
        diffs = torch.cat([(weights[k] - base[k]).abs().flatten() for k in base])
        off = int((diffs > 1e-5).sum())
        assert off <= 1e-5 * diffs.numel() and float(diffs.max()) < 1e-4, \
            f"{ranks} rank(s) x micro-batch {micro}: {off} parameters differ by > 1e-5 (max {float(diffs.max()):.3g})"
        assert stats["loss"] == pytest.approx(base_stats["loss"], rel=1e-5, abs=1e-7)
        assert stats["grad_norm"] == pytest.approx(base_stats["grad_norm"], rel=1e-4)
    initial = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model).state_dict()
    moved = max((base[k] - initial[k]).abs().max().item() for k in base)
    assert moved > 1e-4, "the step did not move the parameters"


def test_split_across_ranks_balances_tokens():
    lengths = [50, 10, 40, 30, 20, 60, 5, 25]
    ranks = split_across_ranks(lengths, 2)
    assert sorted(i for r in ranks for i in r) == list(range(8)) and [len(r) for r in ranks] == [4, 4]
    loads = [sum(lengths[i] for i in r) for r in ranks]
    assert abs(loads[0] - loads[1]) <= 10
    assert split_across_ranks([1, 2], 3) == [[1], [0], []]  # log-prob passes: the last rank idles


def test_mini_batches_of_a_thin_step():
    """Whole groups go round-robin into the mini-batches; a step with fewer groups than
    learner.mini_batches trains on those it has (this crashed the DAPO presets), and a mini-batch
    too small for the ranks joins its neighbour."""
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    assert split_mini_batches(groups, 2, 1) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert split_mini_batches([5, 5, 5], 2, 1) == [[0, 1, 2]]
    assert split_mini_batches([0, 1, 1, 1], 2, 2) == [[0, 1, 2, 3]]
    assert split_mini_batches([0, 0, 1, 2, 2], 3, 2) == [[0, 1], [2, 3, 4]]
    assert split_mini_batches([0], 2, 2) == []
