"""Bad input to `launch/rl.py` ends the run at once (exit status 2) with one message naming the field,
file or resource, before the earlier run's records in the run folder are moved and before any engine
starts. Each case is what a new user typed; the earlier run's metrics.jsonl must come through
untouched."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.preflight import check_cluster, preflight

ROOT = Path(__file__).resolve().parents[1]
EARLIER = '{"stage": "rl", "step": 1, "reward/mean": 0.5}\n'


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "bad"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(EARLIER)
    return run


def _launch(run_dir, config, *overrides, timeout=120):
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "launch/rl.py", "--config", str(config), f"trainer.output_dir={run_dir.parent}",
         "trainer.run_name=bad", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})
    return proc, time.perf_counter() - started


def _assert_refused(proc, run_dir, *fragments):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1] if "\n" not in proc.stderr.strip() else proc.stderr
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == EARLIER
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"], "the run folder was touched"


@pytest.mark.parametrize("overrides, fragments", [
    (["algorithm.advantage=grpoo"], ["algorithm.advantage", "'grpoo'", "'grpo'"]),
    (["model.path=artifacts/no-such-model"], ["model.path", "artifacts/no-such-model", "not a Hugging Face model folder"]),
    (["trainer.steps=-3"], ["trainer.steps must be >= 0, got -3"]),
    (["learner.micro_batch_size=0"], ["learner.micro_batch_size must be >= 1, got 0"]),
    (["learner.deepspeed_config=launch/configs/missing.json"], ["learner.deepspeed_config", "missing.json"]),
    (["data.train=artifacts/demo-data/nope.jsonl"], ["data.train", "nope.jsonl", "is not a file"]),
    (["rollout.max_new_tokens=600"], ["data.max_prompt_tokens (512) + rollout.max_new_tokens (600)",
                                      "model.max_model_len (1024)"]),
    (["learner.num_gpus=1"], ["learner.num_gpus=1", "no CUDA device"]),
    (["rollout.top_p=0.9"], ["rollout.top_p=0.9", "only 1.0"]),
    (["rollout.tensor_parallel_size=2"], ["rollout.tensor_parallel_size=2"]),
    (["algorithm.loss_agg=sum", "algorithm.kl_estimator=k4", "learner.logprob_backend=cuda"],
     ["algorithm.loss_agg", "algorithm.kl_estimator", "learner.logprob_backend"]),
    (["model.reference_path=artifacts/sft-model"], ["model.reference_path", "artifacts/sft-model"]),
    (["trainer.resume=runs/nowhere/checkpoints/step_3"], ["trainer.resume", "step_3 is not a folder"]),
    (["reward.functions=[{name: accuracy, fn: rewards/examples/verl_reward.py:score}]"],
     ["reward.functions[0].fn", "verl_reward.py", "no top-level 'score'"]),
])
def test_bad_values_stop_at_once_naming_the_field(run_dir, tiny_model, demo_data, overrides, fragments):
    proc, seconds = _launch(run_dir, "launch/configs/demo.yaml", *overrides)
    _assert_refused(proc, run_dir, *fragments)
    assert seconds < 60, f"took {seconds:.0f} s: checks must run before any engine starts"


def test_broken_yaml_and_unsupported_zero_stage(run_dir, tiny_model, demo_data, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rollout:\n  group_size: [4\n")
    proc, _ = _launch(run_dir, broken)
    _assert_refused(proc, run_dir, "broken.yaml")
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    proc, _ = _launch(run_dir, "launch/configs/demo.yaml", f"learner.deepspeed_config={zero3}")
    _assert_refused(proc, run_dir, "learner.deepspeed_config", "zero_optimization.stage=4")


def test_a_cluster_too_small_is_refused_naming_the_resource(run_dir, tiny_model, demo_data):
    """Ray is up by then, but nothing is placed: no wait on a placement group that can never be met."""
    proc, seconds = _launch(run_dir, "launch/configs/demo.yaml", "learner.num_ranks=8")
    _assert_refused(proc, run_dir, "9 CPU", "learner.num_ranks x learner.num_cpus = 8", "the Ray cluster has")
    assert seconds < 90


def test_rows_with_more_images_than_allowed(tmp_path, tiny_model, demo_data):
    rows = [json.loads(line) for line in open(f"{demo_data}/val.jsonl")][:3]
    for row in rows:
        row["images"] = [os.path.join(demo_data, p) for p in row["images"]]
    rows[1]["images"] += rows[2]["images"]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("launch/configs/demo.yaml", [f"model.path={tiny_model}", f"data.train={data}", "data.val=null"])
    with pytest.raises(ConfigError, match=r"data\.max_images_per_prompt=1.*two\.jsonl:2 has 2"):
        preflight(cfg)
    cfg.data.max_images_per_prompt = 2
    assert len(preflight(cfg).train) == 3


def test_cluster_check_counts_every_actor():
    cfg = load_config("launch/configs/pathreasoner_grpo_tiny.yaml")
    check_cluster(cfg, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="reward.judge_num_cpus"):
        check_cluster(load_config("launch/configs/pathreasoner_grpo_tiny.yaml", ["reward.judge_num_cpus=1"]),
                      {"CPU": 2.0})
    gpu = load_config("launch/configs/patho_r1_grpo.yaml")
    with pytest.raises(ConfigError, match=r"8 GPU .*but the Ray cluster has 4"):
        check_cluster(gpu, {"CPU": 64.0, "GPU": 4.0})
    pinned = load_config("launch/configs/demo.yaml", ["rollout.resources={rollout_node: 0.5}"])
    check_cluster(pinned, {"CPU": 2.0, "rollout_node": 1.0})
    with pytest.raises(ConfigError, match=r"0.5 rollout_node \(rollout.num_workers x rollout.resources = 0.5\) "
                                          r"but the Ray cluster has 0"):
        check_cluster(pinned, {"CPU": 2.0})


def test_a_placement_the_cluster_cannot_grant_ends_in_bounded_time():
    """Resources exist but are held elsewhere: the wait ends after the timeout, naming what it
    wanted and what is free, instead of hanging the run."""
    import ray

    from rollout.placement import reserve

    ray.init(address="local", num_cpus=1, include_dashboard=False, namespace="pathorl-test-placement")
    try:
        held = reserve([{"CPU": 1.0}], "a run already here", timeout_s=60)
        started = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"learner ranks: Ray could not reserve 1 bundle\(s\) of "
                                               r"\{CPU: 1, GPU: 0\} within 2 s; free now: \{CPU: 0, GPU: 0\}"):
            reserve([{"CPU": 1.0}], "learner ranks", timeout_s=2)
        assert time.perf_counter() - started < 30
        ray.util.remove_placement_group(held)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("command, fragments", [
    (["launch/sft.py", "--config", "launch/configs/pipeline_sft.yaml", "sft.train=artifacts/none.jsonl",
      "sft.segment_weights={think: -1}"], ["sft.segment_weights.think must be a number >= 0"]),
    (["launch/sft.py", "--config", "launch/configs/pipeline_sft.yaml", "sft.train=artifacts/none.jsonl",
      "model.path=artifacts/tiny-qwen2.5-vl"], ["sft.train", "none.jsonl", "is not a file"]),
    (["launch/eval.py", "--model", "base=artifacts/none", "--data", "artifacts/demo-data/val.jsonl"],
     ["--model base", "not a Hugging Face model folder"]),
    (["launch/eval.py", "--model", "artifacts/tiny-qwen2.5-vl", "--data", "artifacts/demo-data/val.jsonl",
      "--correct", "semantic"], ["--correct 'semantic' is not a reward component"]),
])
def test_sft_and_eval_entry_points_refuse_bad_input(run_dir, tiny_model, demo_data, command, fragments):
    proc = subprocess.run([sys.executable, *command, f"trainer.output_dir={run_dir.parent}", "trainer.run_name=bad"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    _assert_refused(proc, run_dir, *fragments)
