"""LoRA policies (`model.lora`, engine/lora.py) on the real stack with the tiny model:

(a) target modules that match no layer stop the run at start-up, naming model.lora.target_modules
    and the layer names that exist; vision-tower layers are targets only with train_vision;
(b) one GRPO step through `Trainer.fit` (bucketed broadcast weight sync, the GPU default): only the
    adapters change, the base weights stay bit-identical; the rollout engine, which received the
    merged weights, scores a fixed sequence as the learner does (1e-4); the reference pass (adapters
    off) equals a plain fp64 transformers forward of the base model; the HF export is the merged
    policy, with the base model's weight names;
(c) `start_rl_stage` folds the adapters into the base: the policy is unchanged and the reference
    becomes it; `load_state` brings the checkpoint's unfolded base and adapters back;
(d) the PathReasoner presets train adapters (rank 64, the paper's; tests/test_presets.py runs the
    tiny one, SFT warm-up and fold included).
"""

import os

import pytest
import ray
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from engine.config import ConfigError, load_config
from engine.data import PromptBuilder, load_rows
from engine.learner import Sequence
from engine.preflight import lora_problems, preflight
from engine.trainer import Trainer

FIXED_RESPONSE = "<think>The brown membranes are DAB.</think><answer>A</answer>"


def _cfg(tiny_model, demo_data, *overrides):
    return load_config("launch/configs/demo.yaml", [
        f"model.path={tiny_model}", f"data.train={demo_data}/train.jsonl", "data.val=null", "model.lora.rank=4",
        *overrides])


def test_target_modules_that_match_nothing_stop_the_run(tiny_model, demo_data):
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tiny_model, demo_data, "model.lora.target_modules=[q_proj,qkv_proj]"))
    message = str(e.value)
    assert "model.lora.target_modules: ['qkv_proj'] match no linear layer" in message
    assert "'gate_proj'" in message and "model.language_model.layers.0.self_attn.q_proj" in message
    # `qkv` exists only in the vision tower: a target with train_vision, not without.
    vision = ["model.lora.target_modules=[qkv]"]
    assert "model.lora.train_vision=false" in lora_problems(_cfg(tiny_model, demo_data, *vision))[0]
    assert lora_problems(_cfg(tiny_model, demo_data, *vision, "model.lora.train_vision=true")) == []
    # train_vision with targets only the language model has would adapt no vision layer: refused.
    language_only = ["model.lora.target_modules=[q_proj,o_proj]", "model.lora.train_vision=true"]
    problem = lora_problems(_cfg(tiny_model, demo_data, *language_only))[0]
    assert "select no layer of the vision tower" in problem and "'qkv'" in problem


def test_pathreasoner_presets_train_lora_adapters():
    assert load_config("launch/configs/pathreasoner_grpo.yaml").model.lora.rank == 64  # the paper's r
    tiny = load_config("launch/configs/pathreasoner_grpo_tiny.yaml").model.lora
    assert tiny.rank == 8 and "q_proj" in tiny.target_modules and not tiny.train_vision


def _fp64_logprobs(model_path, prompt, response_ids):
    """Response log-probs by a plain full forward of transformers' model in fp64."""
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float64)
    ids = torch.tensor([prompt.prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values.double(),
                       image_grid_thw=prompt.image_grid_thw,
                       mm_token_type_ids=(ids == model.config.image_token_id).int()).logits[0]
    logp = torch.log_softmax(logits[len(prompt.prompt_ids) - 1:-1], dim=-1)
    return logp[torch.arange(len(response_ids)), torch.tensor(response_ids)]


def _max_diff(a, b):
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def test_lora_update_sync_reference_and_fold(ray_session, tiny_model, demo_data, tmp_path):
    # Random weights: rewards are all 0 and advantages too; the entropy bonus gives the gradient.
    cfg = _cfg(tiny_model, demo_data, f"trainer.output_dir={tmp_path}", "trainer.run_name=lora", "trainer.steps=1",
               "sft.steps=0", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
               "rollout.weight_sync=broadcast", "algorithm.entropy_coef=0.1", "learner.lr=5e-2",
               "trainer.loggers=[jsonl]", "trainer.log_rollouts=false")
    processor = AutoProcessor.from_pretrained(tiny_model)
    prompt = PromptBuilder.from_config(processor, cfg.data).build(load_rows(f"{demo_data}/val.jsonl")[0][0])
    tokenizer = processor.tokenizer
    response_ids = tokenizer(FIXED_RESPONSE)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    seq, images = Sequence(prompt_ids=prompt.prompt_ids, response_ids=response_ids, image=0), [
        (prompt.pixel_values, prompt.image_grid_thw)]
    def _state(learner):  # runs in the learner actor (a nested function travels by value)
        """The learner's peft model state (base weights and adapters), as CPU copies."""
        return {k: v.detach().to("cpu", copy=True) for k, v in learner.engine.module.state_dict().items()}

    trainer = Trainer(cfg)
    try:
        learner, worker = trainer.learners.weight_source, trainer.pool.workers[0]
        before = ray.get(learner.__ray_call__.remote(_state))
        trainer.fit()
        after = ray.get(learner.__ray_call__.remote(_state))
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and all(".lora_" in k for k in changed), changed
        assert any(".lora_" in k for k in before) and len(before) > len(changed)

        ids, engine = ray.get(worker.prompt_logprobs.remote(prompt.text + FIXED_RESPONSE + "<|im_end|>",
                                                            prompt.images))
        assert ids == prompt.prompt_ids + response_ids
        engine = engine[len(prompt.prompt_ids):]
        old, ref = (trainer.learners.compute_logprobs([seq], images, which)[0] for which in ("old", "ref"))
        assert _max_diff(engine, old) < 1e-4, "the rollout engine does not run the merged adapters"
        assert _max_diff(old, ref) > 1e-3, "the adapters do not act in the policy's forward"
        assert _max_diff(ref, _fp64_logprobs(tiny_model, prompt, response_ids)) < 1e-4

        export = os.path.join(tmp_path, "lora", "hf")
        assert _max_diff(_fp64_logprobs(export, prompt, response_ids), old) < 1e-4
        with safe_open(os.path.join(tiny_model, "model.safetensors"), "pt") as base, \
                safe_open(os.path.join(export, "model.safetensors"), "pt") as merged:
            assert set(merged.keys()) == set(base.keys())

        trainer.learners.start_rl_stage()
        folded_old, folded_ref = (trainer.learners.compute_logprobs([seq], images, which)[0] for which in ("old", "ref"))
        assert _max_diff(folded_old, old) < 1e-5 and _max_diff(folded_ref, folded_old) < 1e-6
        folded = ray.get(learner.__ray_call__.remote(_state))
        assert all(not v.any() for k, v in folded.items() if ".lora_B." in k)

        trainer.learners.load_state(os.path.join(tmp_path, "lora", "checkpoints", "step_1", "learner"))
        restored = ray.get(learner.__ray_call__.remote(_state))
        assert all(torch.equal(restored[k], after[k]) for k in after)
    finally:
        trainer.close()
