"""The shared-prefix pass (engine/collate.py) against one sequence per response, on the real tiny
Qwen2.5-VL in fp32: per-token log-probs within 1e-5 and every parameter gradient within 1e-4
relative, for groups with two images per prompt, a text-only prompt, ragged and empty responses, a
sampled <|image_pad|> in a response, and micro-batches that split a group (each part computing the
prompt once). The learner-level check — the same DeepSpeed update with the flag on and off — is in
tests/test_learner_split.py; the learner's loss against fp64 formulas in tests/test_learner_loss.py
runs with the shared pass (the default)."""

import logging

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from engine.collate import collate, collate_shared, selected_hidden, shared_prefix_supported
from engine.data import PromptBuilder, load_rows
from engine.learner import Sequence
from engine.learner_group import make_shards, pack_by_tokens, pass_tokens, unique_tokens

VISION = [151655, 151656]


@pytest.fixture(scope="module")
def model(tiny_model):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)


@pytest.fixture(scope="module")
def step(tiny_model, demo_data):
    """Three groups: a prompt with two images, one with one image, one text-only."""
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows, _ = load_rows(f"{demo_data}/val.jsonl")
    builder = PromptBuilder(processor, "You are a pathology expert.", 1024)
    two = dict(rows[0], images=rows[0]["images"] + rows[3]["images"])
    prompts = [builder.build(two), builder.build(rows[1]), builder.build(dict(rows[2], images=[]))]
    assert len(prompts[0].image_grid_thw) == 2 and prompts[2].pixel_values is None
    images = [(p.pixel_values, p.image_grid_thw) for p in prompts[:2]]
    g = torch.Generator().manual_seed(0)
    seqs = []
    for group, lengths in enumerate([[5, 0, 9, 3], [12, 1, 7], [4, 6]]):
        for n in lengths:
            seqs.append(Sequence(prompt_ids=prompts[group].prompt_ids, image=group if group < 2 else -1,
                                 response_ids=torch.randint(0, 151000, (n,), generator=g).tolist()))
    seqs[2].response_ids[3] = VISION[0]  # sampled as text: must not take an image's features
    return seqs, images


def _pass(model, batches):
    """Log-probs of every response token and the gradient of a fixed weighting of them, summed over
    the micro-batches (as the learner accumulates them)."""
    model.zero_grad()
    logps = []
    for batch in batches:
        logits = model.lm_head(selected_hidden(model, batch, "cpu"))
        logp = torch.log_softmax(logits, -1).gather(-1, batch["targets"][:, None])[:, 0]
        (logp * torch.cos(batch["targets"].float())).sum().backward()  # a weight per token, whatever the split
        logps.append(logp.detach())
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logps, grads


def _close(grads, reference):
    assert grads.keys() == reference.keys()
    for k, ref in reference.items():
        err = float((grads[k] - ref).norm() / ref.norm().clamp_min(1e-30))
        assert err < 1e-4, f"gradient of {k}: relative error {err:.2e}"


def test_shared_pass_equals_unshared(model, step):
    seqs, images = step
    image_token = model.config.image_token_id
    reference = [collate([s], images, image_token, VISION) for s in seqs]  # one row each: nothing shared
    ref_logps, ref_grads = _pass(model, reference)
    shared = collate_shared(seqs, images, image_token, VISION, model.model.get_rope_index)
    assert shared["ids"].shape[0] == 3 and shared["pixel_values"].shape[0] == sum(len(p) for p, _ in images)
    logps, grads = _pass(model, [shared])
    assert torch.allclose(logps[0], torch.cat(ref_logps), atol=1e-5, rtol=0)
    _close(grads, ref_grads)
    # Micro-batches of 4 sequences cut the first and second groups: each part has its own prompt row.
    parts = [seqs[k:k + 4] for k in range(0, len(seqs), 4)]
    logps, grads = _pass(model, [collate_shared(p, images, image_token, VISION, model.model.get_rope_index)
                                 for p in parts])
    assert torch.allclose(torch.cat(logps), torch.cat(ref_logps), atol=1e-5, rtol=0)
    _close(grads, ref_grads)


def test_shards_keep_groups_together():
    seqs = [Sequence(prompt_ids=[7] * 10 + [g], response_ids=[1] * n)
            for g, lengths in enumerate([[2, 3, 4], [1, 1, 1], [5, 5, 5]]) for n in lengths]
    interleaved = [seqs[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]
    shards = make_shards(interleaved, [], world_size=2, micro_batch_size=8, max_tokens=30, shared_prefix=True)
    assert sorted(i for s in shards for i in s.index) == list(range(9))
    for shard in shards:
        owners = [s.prompt_ids[-1] for s in shard.sequences]
        runs = [o for k, o in enumerate(owners) if k == 0 or owners[k - 1] != o]
        assert len(runs) == len(set(runs)), f"a prompt's responses are split by another prompt's: {owners}"
        start = 0
        for size in shard.micro_sizes:
            mb = shard.sequences[start:start + size]
            start += size
            rows = {}
            for s in mb:
                rows[s.prompt_ids[-1]] = rows.get(s.prompt_ids[-1], len(s.prompt_ids)) + len(s.response_ids)
            assert size <= 1 or len(rows) * max(rows.values()) <= 30
    # One rank, one micro-batch: the shared pass feeds exactly the unique tokens (3 prompts of 11 and
    # 27 response tokens), the unshared pass every sequence's prompt again.
    one = make_shards(interleaved, [], world_size=1, micro_batch_size=9, shared_prefix=True)
    assert unique_tokens(interleaved) == 3 * 11 + 27 == pass_tokens(one, shared_prefix=True)[0]
    assert pass_tokens(one, shared_prefix=True)[1] == 3 * (11 + 15)
    assert pass_tokens(one, shared_prefix=False) == (9 * 11 + 27, 9 * (11 + 5))
    # 11-token prompt + 2 + 3 + 4 = 20 packed tokens: one row, where unshared it is 3 x 15 = 45 padded.
    assert pack_by_tokens([("a", 11, 2), ("a", 11, 3), ("a", 11, 4)], 30) == [3]
    assert pack_by_tokens([(0, 11, 2), (1, 11, 3), (2, 11, 4)], 30) == [2, 1]


def test_a_model_without_rope_index_runs_unshared(caplog):
    text_only = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    with caplog.at_level(logging.WARNING):
        assert not shared_prefix_supported(text_only, wanted=True)
    assert "Qwen2ForCausalLM" in caplog.text and "get_rope_index" in caplog.text
    assert not shared_prefix_supported(text_only, wanted=False)
