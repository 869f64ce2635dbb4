"""The real stack end to end (Ray + vLLM + DeepSpeed + reward workers, tiny model, demo data):
an SFT warm-up and RL steps through `Trainer.fit`, then the checks that matter for RL correctness:

(a) metrics.jsonl has the per-step keys, and the final checkpoint loads in transformers and vLLM;
(b) after the weight sync, the rollout engine's log-probs of a fixed sequence equal the learner's
    (tolerance 1e-4; fp32 on both sides agrees to ~2e-6) and differ from before the updates;
(c) a step-0 evaluation (trainer.eval_before_train) with pass@k, and the standalone evaluator
    (launch/eval.py) on the final model reproduces the run's last greedy evaluation.
"""

import json
import os

import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoProcessor

from engine.config import load_config
from engine.evaluate import summarize
from engine.learner import Sequence
from engine.trainer import Trainer
from launch.eval import evaluate_model

REQUIRED = ["step", "reward/mean", "reward/format", "reward/accuracy", "response_length/mean", "loss", "kl",
            "throughput/tokens_per_s", "timing/rollout", "timing/reward", "timing/filter", "timing/old_ref_logprobs",
            "timing/advantages", "timing/update", "timing/weight_sync", "timing/step"]
FIXED_RESPONSE = "<think>The brown membranes are DAB.</think><answer>A</answer>"


def _engine_view(worker, prompt, response):
    ids, logprobs = ray.get(worker.prompt_logprobs.remote(prompt.text + response + "<|im_end|>", prompt.images))
    return ids, torch.tensor(logprobs[len(prompt.prompt_ids):])


def test_train_sync_and_checkpoint(ray_session, tiny_model, demo_data, tmp_path):
    cfg = load_config("launch/configs/demo.yaml", [
        f"model.path={tiny_model}", f"data.train={demo_data}/train.jsonl", f"data.val={demo_data}/val.jsonl",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=it", "trainer.steps=2", "trainer.eval_max_rows=4",
        "sft.steps=3", "sft.batch_size=4", "rollout.prompts_per_step=3", "rollout.group_size=4",
        "rollout.max_new_tokens=24", "rollout.temperature=1.0", "learner.lr=1e-3", "trainer.eval_before_train=true",
        "trainer.eval_n=2"])
    trainer = Trainer(cfg)
    try:
        worker = trainer.pool.workers[0]
        prompt = trainer.builder.build(trainer.val_rows[0])
        response_ids = trainer.tokenizer(FIXED_RESPONSE)["input_ids"] + [trainer.tokenizer.convert_tokens_to_ids(
            "<|im_end|>")]
        ids_before, before = _engine_view(worker, prompt, FIXED_RESPONSE)
        assert ids_before == prompt.prompt_ids + response_ids  # token-in/token-out: the same ids on both sides

        trainer.fit()

        ids_after, after = _engine_view(worker, prompt, FIXED_RESPONSE)
        learner = trainer.learners.compute_logprobs(
            [Sequence(prompt_ids=prompt.prompt_ids, response_ids=response_ids, image=0)],
            [(prompt.pixel_values, prompt.image_grid_thw)], "old")[0]
        assert ids_after == ids_before
        assert (after - torch.tensor(learner)).abs().max() < 1e-4
        assert (after - before).abs().max() > 1e-2, "the rollout engine still runs the initial weights"
    finally:
        trainer.close()

    records = [json.loads(line) for line in open(tmp_path / "it" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["stage"] == "sft"] == [1, 2, 3]
    baseline, *rl = [r for r in records if r["stage"] == "rl"]
    assert baseline["step"] == 0 and baseline["eval/rows"] == 4 and "eval/pass@2" in baseline
    assert [r["step"] for r in rl] == [1, 2]
    for record in rl:
        missing = [k for k in REQUIRED if k not in record]
        assert not missing, missing
        assert 0.0 <= record["reward/mean"] <= 1.0 and record["kl"] >= 0.0 and record["rollout/groups"] == 3
    assert "eval/reward/mean" in rl[-1]
    assert {"reward.png", "kl.png", "step_time.png"} <= set(os.listdir(tmp_path / "it" / "plots"))
    # TensorBoard (default loggers: jsonl + tensorboard), read back with tensorboard's own reader.
    for stage, rows in (("sft", [r for r in records if r["stage"] == "sft"]), ("rl", [baseline, *rl])):
        events = EventAccumulator(str(tmp_path / "it" / "tensorboard" / stage), size_guidance={"scalars": 0})
        events.Reload()
        for row in rows:
            for key, value in row.items():
                if isinstance(value, float) and key != "step":
                    logged = {e.step: e.value for e in events.Scalars(key)}[row["step"]]
                    assert logged == pytest.approx(value, rel=1e-6, abs=1e-30), (stage, key)

    checkpoint = rl[-1]["checkpoint"]
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)
    assert model.config.text_config.hidden_size == 128
    # vLLM loads the checkpoint folder (weights, config, tokenizer, processor) and sees the trained policy.
    from rollout.worker import RolloutWorker

    fresh = ray.remote(RolloutWorker).options(num_cpus=1, max_concurrency=4).remote(
        index=0, model_path=checkpoint, sampling={"max_tokens": 4}, kv_cache_gib=1.0)
    _, from_checkpoint = _engine_view(fresh, prompt, FIXED_RESPONSE)
    assert (from_checkpoint - after).abs().max() < 1e-4
    ray.kill(fresh)
    assert os.path.exists(os.path.join(checkpoint, "tokenizer.json"))
    assert os.path.exists(os.path.join(checkpoint, "generation_config.json"))
    # The export's processor (written by save_pretrained, not copied from model.path) prepares a
    # prompt exactly as the original does.
    exported = AutoProcessor.from_pretrained(checkpoint)
    again = exported(text=[prompt.text], images=prompt.images, return_tensors="pt")
    assert again["input_ids"][0].tolist() == prompt.prompt_ids
    assert torch.equal(again["pixel_values"], prompt.pixel_values)

    # The standalone evaluator on the final model scores the validation rows as the run's last
    # evaluation did (greedy decoding: the same responses).
    final = tmp_path / "it" / "hf"
    judged = evaluate_model(cfg, str(final), trainer.val_rows[:4], n=2, temperature=1.0, correct="accuracy",
                            threshold=1.0)
    summary = summarize(judged, 2)["overall"]
    assert summary["rows"] == 4
    for key in ("greedy_accuracy", "format_rate", "mean_length"):
        assert summary[key] == rl[-1][f"eval/{key}"], key
