"""Reward files written for verl, EasyR1, OpenRLHF and TRL run unchanged (rewards/examples/)."""

from pathlib import Path

import numpy as np
import pytest

from rewards import RewardInput, RewardRunner, RewardSpec
from rewards.compat import NonFiniteScore, ReturnTypeError, coerce, split_batch

ROOT = Path(__file__).resolve().parents[1]
MC = {"id": "mc", "question": "Diagnosis?", "options": ["Adenoma", "Carcinoma", "Normal"], "answer": "B",
      "data_source": "demo"}
OPEN = {"id": "open", "question": "Diagnosis?", "answer": "carcinoma", "data_source": "demo"}
# (row, response, response_ids length, truncated)
CASES = [
    (MC, "<think>glands invade</think><answer>B</answer>", 64, False),   # right, well formed
    (MC, "<think>x</think><answer>A</answer>", 32, False),               # wrong
    (OPEN, "<think>x</think><answer>carcinoma</answer>", 64, False),     # open-ended row
    (MC, "B", 95, True),                                                 # no tags, long, truncated
]

SPECS = [
    RewardSpec("verl", "rewards/examples/verl_reward.py:compute_score"),  # relative to the cwd
    RewardSpec("verl_batch", "rewards/examples/verl_batch_reward.py:compute_score"),
    RewardSpec("easyr1_batch", "rewards/examples/easyr1_batch_reward.py:compute_score", kwargs={"format_weight": 0.1}),
    RewardSpec("easyr1_seq", "rewards/examples/easyr1_sequential_reward.py:compute_score",
               kwargs={"max_response_length": 100, "overlong_buffer_length": 20}),
    RewardSpec("openrlhf", "rewards/examples/openrlhf_reward.py:reward_func"),
    RewardSpec("trl_choice", "rewards/examples/trl_reward.py:choice_reward"),
    RewardSpec("trl_length", "rewards/examples/trl_reward.py:length_reward"),
    RewardSpec("native", "rewards/examples/native_reward.py:concise_reward", kwargs={"limit": 70}),
]


@pytest.fixture(scope="module")
def batch():
    inputs = [RewardInput.from_row(k, row, text, list(range(n)), truncated=t)
              for k, (row, text, n, t) in enumerate(CASES)]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        with RewardRunner(SPECS, timeout_s=60) as runner:
            styles = runner.styles
            result = runner.score(inputs)
    assert styles == ["verl", "verl_batch", "easyr1_batch", "easyr1_sequential", "openrlhf", "trl", "trl", "native"]
    return result


def test_no_errors(batch):
    assert batch.errors == []


def test_verl_per_sample_and_batch(batch):
    assert batch.components["verl"] == [1.0, 0.0, 0.0, 0.0]
    assert batch.metrics["verl/answered"] == [1.0, 1.0, 0.0, 0.0]
    assert batch.components["verl_batch"] == [1.0, 0.0, 0.0, 0.0]


def test_easyr1_batch_and_sequential(batch):
    # overall = 0.9 * accuracy + 0.1 * format
    assert batch.components["easyr1_batch"] == pytest.approx([1.0, 0.1, 1.0, 0.0])
    assert batch.metrics["easyr1_batch/format"] == [1.0, 1.0, 1.0, 0.0]
    # +-1 accuracy plus overlong: length 95 with L_max 100, L_c 20 -> (80 - 95) / 20 = -0.75.
    assert batch.components["easyr1_seq"] == pytest.approx([1.0, -1.0, -1.0, -1.75])
    assert batch.metrics["easyr1_seq/overlong"] == pytest.approx([0.0, 0.0, 0.0, -0.75])


def test_openrlhf_queries_prompts_labels_and_tensors(batch):
    assert batch.components["openrlhf"] == [1.0, 0.0, 0.0, 0.0]
    assert batch.metrics["openrlhf/scores"] == [1.0, 0.0, 0.0, 0.0]
    # the file recovers the response as query[len(prompt):]
    assert batch.metrics["openrlhf/response_chars"] == [float(len(c[1])) for c in CASES]


def test_trl_columns_none_and_async(batch):
    assert batch.components["trl_choice"] == [1.0, 0.0, None, 0.0]   # None: the open row has no options
    assert batch.components["trl_length"] == pytest.approx([0.0, -0.5, 0.0, -31 / 64])


def test_native_reads_length_and_truncation(batch):
    assert batch.components["native"] == [1.0, 1.0, 1.0, -1.0]
    assert batch.metrics["native/over"] == [0.0, 0.0, 0.0, 1.0]


def test_summed_score_skips_not_applicable_components(batch):
    expected = sum(batch.components[name][2] for name in batch.components if name != "trl_choice")
    assert batch.scores[2] == pytest.approx(expected)


def test_coerce_accepts_numbers_arrays_and_rejects_the_rest():
    assert coerce("verl", np.float32(0.5)) == (0.5, {})
    assert coerce("verl", True) == (1.0, {})
    assert coerce("verl", np.array(2.0)) == (2.0, {})
    assert coerce("easyr1_batch", {"overall": 1, "format": 0.5, "note": "text"}) == (1.0, {"format": 0.5})
    with pytest.raises(ReturnTypeError, match="without the score key 'overall'"):
        coerce("easyr1_batch", {"score": 1.0})
    with pytest.raises(ReturnTypeError, match="must be a number"):
        coerce("verl", "1.0")
    with pytest.raises(NonFiniteScore):
        coerce("native", {"score": float("nan")})
    assert split_batch("openrlhf", np.array([1.0, 0.0]), 2) == [1.0, 0.0]
    with pytest.raises(ReturnTypeError, match="3 values for 2 samples"):
        split_batch("trl", [1.0, 2.0, 3.0], 2)
