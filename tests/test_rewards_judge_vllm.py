"""SLOW (about a minute on 2 cores): the one test that starts Ray and a vLLM engine. The judge reward
with a real `JudgeActor` serving the tiny random Qwen2.5-VL model (launch/build_tiny_model.py), text
only, its replies constrained to "Score: <number in [0,1]>"."""

import importlib.util
import re

import pytest

from rewards import RewardInput, RewardRunner, RewardSpec
from rewards.judge import SCORE_REGEX, judge_messages, start_judge_actor

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("ray") is None,
                                reason="needs vllm and ray")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="pathorl-test")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_vllm_judge_actor_scores_every_answer(ray_cluster, tmp_path_factory, monkeypatch):
    from launch.build_tiny_model import build

    model = build(str(tmp_path_factory.mktemp("judge") / "tiny"), seed=0)
    actor = start_judge_actor(model, name="test-judge", namespace="pathorl-test", num_cpus=1,
                              env_vars={"VLLM_CPU_KVCACHE_SPACE": "1"}, max_model_len=1024, dtype="float32",
                              enforce_eager=True)
    row = {"id": "v", "question": "Diagnosis?", "options": ["Adenoma", "Carcinoma"], "answer": "B"}
    answers = ["B", "Adenoma", None, "It is a carcinoma"]
    inputs = [RewardInput.from_row(k, row, f"<think>x</think><answer>{a}</answer>" if a else "no answer")
              for k, a in enumerate(answers)]
    import ray

    replies = ray.get(actor.generate.remote([judge_messages(inputs[0], "B")], 16, 0.0, SCORE_REGEX))
    assert re.fullmatch(SCORE_REGEX, replies[0]), replies
    spec = RewardSpec("semantic", "judge_vllm", kwargs={"actor_name": "test-judge", "namespace": "pathorl-test",
                                                        "ray_address": ray_cluster})
    with RewardRunner([spec], num_workers=1, timeout_s=120) as runner:
        batch = runner.score(inputs)
    assert batch.errors == []
    assert batch.components["semantic"][2] == 0.0 and batch.metrics["semantic/no_answer"] == [0.0, 0.0, 1.0, 0.0]
    assert all(0.0 <= s <= 1.0 for s in batch.components["semantic"])
    ray.kill(actor)
