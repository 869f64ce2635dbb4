"""ZeRO-3 on two gloo ranks (CPU), where every rank holds only a slice of each parameter:

(a) after an update, the weights gathered for the sync reach vLLM intact: the rollout engine's
    log-probs of a fixed sequence equal the learner's, and differ from the initial model's;
(b) the partitioned training state saves and restores: a fresh pair of ranks loaded from the
    checkpoint takes the next update to the same weights as the ranks that never stopped, and the
    Hugging Face export written from the partitions loads in transformers with those weights.
"""

import json

import ray
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from engine.config import load_config
from engine.data import PromptBuilder, load_rows
from engine.learner import Sequence
from engine.learner_group import LearnerGroup
from rollout.pool import RolloutPool

RESPONSE = "<think>The brown membranes are DAB.</think><answer>A</answer>"


def _cfg(tiny_model, tmp_path):
    ds = tmp_path / "zero3.json"
    # Persistence threshold 0: even the smallest parameters are partitioned (the default keeps
    # those under 1e5 elements whole, which would be most of the tiny model).
    ds.write_text(json.dumps({**json.load(open("launch/configs/deepspeed_zero3.json")),
                              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    return load_config("launch/configs/demo.yaml", [
        f"model.path={tiny_model}", f"learner.deepspeed_config={ds}", "learner.num_ranks=2", "learner.num_cpus=0.5",
        "learner.torch_threads=1", "learner.micro_batch_size=2", "learner.lr=1e-3", "algorithm.kl_loss_coef=0",
        "rollout.temperature=1.0"])


def _batch(tiny_model, demo_data, cfg):
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows, _ = load_rows(f"{demo_data}/val.jsonl")
    builder = PromptBuilder(processor, cfg.data.system_prompt, 512)
    prompts = [builder.build(r) for r in rows[:2]]
    images = [(p.pixel_values, p.image_grid_thw) for p in prompts]
    g = torch.Generator().manual_seed(5)
    seqs = [Sequence(prompt_ids=prompts[i % 2].prompt_ids, image=i % 2,
                     response_ids=torch.randint(0, 151000, (3 + i,), generator=g).tolist(),
                     advantage=float(torch.randn((), generator=g)), rollout_logprobs=[-5.0] * (3 + i))
            for i in range(5)]   # odd: one rank gets more sequences and runs an extra micro-batch
    fixed = Sequence(prompt_ids=prompts[0].prompt_ids, image=0,
                     response_ids=processor.tokenizer(RESPONSE)["input_ids"])
    return prompts[0], seqs, images, fixed


def _weights(learners):
    learners.gather_weights()
    return ray.get(learners.weight_source.export_weights.remote())


def test_zero3_sync_save_and_resume(ray_session, tiny_model, demo_data, tmp_path):
    cfg = _cfg(tiny_model, tmp_path)
    prompt, seqs, images, fixed = _batch(tiny_model, demo_data, cfg)
    pool = RolloutPool(tiny_model, 1, sampling={"max_tokens": 4}, num_cpus_per_worker=1.0)
    learners = LearnerGroup(cfg)
    try:
        pool.wait_ready()
        learners.wait_ready()
        worker = pool.workers[0]

        def engine_view():
            _, logprobs = ray.get(worker.prompt_logprobs.remote(prompt.text + RESPONSE, prompt.images))
            return torch.tensor(logprobs[len(prompt.prompt_ids):])

        before = engine_view()
        learners.update([seqs], images)
        learners.gather_weights()
        pool.sync_weights(learners.weight_source)
        after = engine_view()
        learner_view = torch.tensor(learners.compute_logprobs([fixed], [images[0]], "old")[0])
        assert (after - learner_view).abs().max() < 1e-4
        assert (after - before).abs().max() > 1e-3, "vLLM still runs the initial weights"

        learners.save_state(str(tmp_path / "state"))
        learners.save(str(tmp_path / "hf"))
        saved = _weights(learners)
        learners.update([seqs[:2], seqs[2:]], images)
        uninterrupted = _weights(learners)
    finally:
        learners.shutdown()
        pool.shutdown()

    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).state_dict()
    assert max((exported[k] - saved[k]).abs().max().item() for k in saved) == 0.0

    resumed = LearnerGroup(cfg)
    try:
        resumed.wait_ready()
        resumed.load_state(str(tmp_path / "state"))
        assert max((_weights(resumed)[k] - saved[k]).abs().max().item() for k in saved) == 0.0
        resumed.update([seqs[:2], seqs[2:]], images)
        again = _weights(resumed)
    finally:
        resumed.shutdown()
    worst = max((again[k] - uninterrupted[k]).abs().max().item() for k in again)
    assert worst < 1e-7, f"the resumed update differs by {worst:.3g}: optimizer state not restored"
    assert max((again[k] - saved[k]).abs().max().item() for k in again) > 1e-4
