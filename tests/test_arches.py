"""Every Qwen-VL generation `launch/build_tiny_model.py --arch` builds runs on the real stack through
the Auto classes (AutoModelForImageTextToText, AutoProcessor): vLLM rollouts, a DeepSpeed learner
update with the shared-prefix passes, the weight sync — after which the rollout engine's log-probs
of a fixed response equal the learner's — and the Hugging Face export, which transformers loads as
the same class and whose log-probs equal the engine's. Qwen2.5-VL, the default, goes through the
same checks in tests/test_integration.py (which also loads its export in a fresh vLLM engine)."""

import json

import pytest
import ray
import torch
from transformers import AutoModelForImageTextToText

from engine.config import load_config
from engine.learner import Sequence
from engine.preflight import model_problems
from engine.trainer import Trainer
from launch.build_tiny_model import build

RESPONSE = "<think>Pink and purple.</think><answer>C</answer>"


def _engine_view(worker, prompt, response):
    ids, logprobs = ray.get(worker.prompt_logprobs.remote(prompt.text + response + "<|im_end|>", prompt.images))
    return ids, torch.tensor(logprobs[len(prompt.prompt_ids):])


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_arch_trains_syncs_and_exports(ray_session, demo_data, tmp_path, arch):
    model = build(str(tmp_path / arch), arch=arch)
    assert not model_problems(model, "model.path")
    cfg = load_config("launch/configs/demo.yaml", [
        f"model.path={model}", f"data.train={demo_data}/train.jsonl", f"data.val={demo_data}/val.jsonl",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=run", "trainer.steps=1", "trainer.eval_every=0",
        "trainer.eval_max_rows=2", "sft.steps=0", "rollout.prompts_per_step=2", "rollout.group_size=3",
        "rollout.max_new_tokens=8", "learner.lr=1e-2", "trainer.loggers=[jsonl]",
        "algorithm.entropy_coef=0.1"])  # random weights score 0: the entropy bonus moves them
    trainer = Trainer(cfg)
    try:
        assert json.load(open(f"{model}/config.json"))["model_type"] == arch
        worker = trainer.pool.workers[0]
        prompt = trainer.builder.build(trainer.val_rows[0])
        response_ids = trainer.tokenizer(RESPONSE)["input_ids"] + [trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        ids, before = _engine_view(worker, prompt, RESPONSE)
        assert ids == prompt.prompt_ids + response_ids  # vLLM's prompt ids are the processor's
        trainer.fit()
        _, after = _engine_view(worker, prompt, RESPONSE)
        learner = trainer.learners.compute_logprobs(
            [Sequence(prompt_ids=prompt.prompt_ids, response_ids=response_ids, image=0)],
            [(prompt.pixel_values, prompt.image_grid_thw)], "old")[0]
        assert (after - torch.tensor(learner)).abs().max() < 1e-4
        assert (after - before).abs().max() > 1e-3, "the rollout engine still runs the initial weights"
    finally:
        trainer.close()
    # The export in transformers: its class, and its log-probs of the fixed response are the engine's.
    export = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32)
    assert type(export).__name__ == json.load(open(f"{model}/config.json"))["architectures"][0]
    ids = torch.tensor([prompt.prompt_ids + response_ids])
    with torch.no_grad():
        logits = export(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
                        image_grid_thw=prompt.image_grid_thw,
                        mm_token_type_ids=(ids == export.config.image_token_id).int()).logits[0]
    logp = torch.log_softmax(logits[len(prompt.prompt_ids) - 1:-1].double(), -1)
    exported = logp[torch.arange(len(response_ids)), torch.tensor(response_ids)]
    assert (exported - after.double()).abs().max() < 1e-4


def test_a_model_that_is_not_a_vision_language_policy(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    (problem,) = model_problems(str(tmp_path), "model.path")
    assert "model.path" in problem and "'qwen2'" in problem and "AutoModelForImageTextToText" in problem
