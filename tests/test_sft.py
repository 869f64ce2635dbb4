"""The SFT stage on the real stack (Ray + DeepSpeed learner ranks, tiny model, demo images):

(a) the supervised loss of segment-weighted, multi-turn, multi-image examples equals the weighted
    negative log-likelihood computed in fp64 by a plain transformers forward (temperature 1, whatever
    the rollout temperature), and the update is the same in one micro-batch as in token-budget
    micro-batches on two ranks;
(b) `launch/sft.py`'s stage end to end: epochs over a ShareGPT file with a bad row (skipped, counted),
    validation loss, full-state checkpoints, the final model in <run>/hf loadable by transformers,
    and an interrupted stage resumed from its checkpoint ends with the uninterrupted stage's weights.
"""

import json

import pytest
import ray
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from engine.config import load_config
from engine.learner_group import LearnerGroup
from engine.sft import SFTStage, to_sequences
from engine.sft import train as sft_loop
from engine.sft_data import ExampleBuilder, normalise

SEGMENTS = {"observe": 0.0, "think": 0.5, "answer": 1.0}


def _rows():
    target = "<observe>brown rings</observe><think>DAB marks antigen</think><answer>A</answer>"
    return [
        {"conversations": [{"from": "human", "value": "<image>Which stain?"}, {"from": "gpt", "value": target},
                           {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "<answer>B</answer>"}],
         "images": ["images/train_stain_0064.png", "images/train_stain_0053.png"]},
        {"caption": "<answer>An H&E patch.</answer>", "image": "images/train_content_0096.png"},
        {"messages": [{"role": "user", "content": "<image>What is shown?"},
                      {"role": "assistant", "content": "<think>pink</think><answer>tissue</answer>"}],
         "images": ["images/train_content_0097.png"]},
        {"conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "<answer>yes</answer>"}]},
    ]


def _cfg(tiny_model, tmp_path, *overrides):
    return load_config(None, [f"model.path={tiny_model}", "learner.torch_threads=1", "learner.micro_batch_size=8",
                              "learner.grad_clip=0", "sft.lr=1e-3", "rollout.temperature=0.8",
                              f"trainer.output_dir={tmp_path}", *overrides])


def _fp64_nll(tiny_model, seqs, images):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float64)
    total = weight = 0.0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            kw = {}
            if s.image >= 0:
                kw = {"pixel_values": images[s.image][0].double(), "image_grid_thw": images[s.image][1]}
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=(ids == model.config.image_token_id).int(), **kw).logits[0]
            logp = torch.log_softmax(logits[len(s.prompt_ids) - 1:-1], dim=-1)
            picked = logp[torch.arange(len(s.response_ids)), torch.tensor(s.response_ids)]
            w = torch.tensor(s.loss_weights, dtype=torch.float64)
            total += float(-(w * picked).sum())
            weight += float(w.sum())
    return total / weight


def test_weighted_loss_matches_fp64_and_split_does_not_matter(ray_session, tiny_model, demo_data, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_model)
    builder = ExampleBuilder(processor, demo_data, SEGMENTS, 4096)
    examples = [builder.build(normalise(r, f"row{i}", "You are a pathology expert.", "Describe.")) for i, r in
                enumerate(_rows())]
    seqs, images = to_sequences(examples)
    assert any(0 < w < 1 for s in seqs for w in s.loss_weights) and any(w == 0 for s in seqs for w in s.loss_weights)
    reference = _fp64_nll(tiny_model, seqs, images)

    results = []
    for ranks, budget in [(1, 0), (2, 400)]:
        learners = LearnerGroup(_cfg(tiny_model, tmp_path, f"learner.num_ranks={ranks}"), use_reference=False)
        learners.wait_ready()
        try:
            stats = learners.sft_update(seqs, images, lr=1e-3, max_tokens=budget)
            results.append((stats, ray.get(learners.weight_source.export_weights.remote())))
        finally:
            learners.shutdown()
    (base_stats, base), *others = results
    assert base_stats["sft/nll"] == pytest.approx(reference, rel=1e-4)
    for stats, weights in others:
        assert stats["sft/nll"] == pytest.approx(base_stats["sft/nll"], rel=1e-5)
        assert stats["grad_norm"] == pytest.approx(base_stats["grad_norm"], rel=1e-5)
        # Adam's first step is ~lr·sign(g): the few parameters whose gradient is near Adam's eps
        # (vision weights feeding mostly zero-weight tokens) move by a fraction of lr that float
        # summation order shifts; a loss normalised per micro-batch or rank moves most of them by ~lr.
        diffs = torch.cat([(weights[k] - base[k]).abs().flatten() for k in base])
        assert int((diffs > 1e-5).sum()) <= 1e-5 * diffs.numel() and float(diffs.max()) < 2e-4, \
            f"token-budget / 2-rank update differs: {int((diffs > 1e-5).sum())} parameters by > 1e-5"


def test_sft_stage_end_to_end_with_resume(ray_session, tiny_model, demo_data, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [dict(r, **({"images": [f"{demo_data}/{p}" for p in r["images"]]} if "images" in r else
                       {"image": f"{demo_data}/{r['image']}"} if "image" in r else {})) for r in _rows()]
    lines = [json.dumps(r) for r in rows] + [json.dumps({"conversations": [{"from": "human", "value": "no answer"}]})]
    data.write_text("\n".join(lines) + "\n")
    common = [f"sft.train={data}", f"sft.val={data}", "sft.batch_size=2", "sft.epochs=2", "sft.eval_every=2",
              "sft.lr_schedule=cosine", "sft.warmup_steps=1", "sft.max_tokens_per_micro_batch=600",
              "trainer.keep_last=0"]

    full = SFTStage(_cfg(tiny_model, tmp_path, "trainer.run_name=full", *common))
    try:
        final = full.fit()
    finally:
        full.close()
    records = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["stage"] == "sft" for r in records)
    # warm-up 1 step, then cosine over the 3 others: 1, ½(1 + cos(π/3)), ½(1 + cos(2π/3)), 0 (× lr)
    assert [r["sft/lr"] for r in records][:3] == pytest.approx([1e-3, 0.75e-3, 0.25e-3])
    assert records[-1]["sft/lr"] == pytest.approx(0.0, abs=1e-12)
    assert "sft/val_nll" in records[1] and "sft/val_nll" in records[3] and "sft/val_nll" not in records[0]
    assert records[3]["sft/val_nll"] < records[1]["sft/val_nll"]
    assert len(full.stream.skipped) == 1 and "no assistant turn" in full.stream.skipped[0]
    assert records[-1]["data/skipped"] == 1.0
    trained = Qwen2_5_VLForConditionalGeneration.from_pretrained(final).state_dict()

    # A crash during step 3, after step 2's checkpoint (save_every=2); then a new stage resumes it.
    part = SFTStage(_cfg(tiny_model, tmp_path, "trainer.run_name=part", "sft.save_every=2", *common))
    served = []

    def crashing_batch():
        served.append(1)
        if len(served) == 3:
            raise RuntimeError("simulated crash")
        return part.stream.take(2)

    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            sft_loop(part.learners, part.cfg.sft, part.metrics, part.total, crashing_batch, save=part._save)
    finally:
        part.close()
    resumed = SFTStage(_cfg(tiny_model, tmp_path, "trainer.run_name=part", *common))
    try:
        assert resumed.start == 3
        final_resumed = resumed.fit()
    finally:
        resumed.close()
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(final_resumed).state_dict()
    worst = max((again[k] - trained[k]).abs().max().item() for k in trained)
    assert worst < 1e-6, f"resumed stage differs from the uninterrupted one by {worst:.3g}"
    steps = [json.loads(x)["step"] for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
