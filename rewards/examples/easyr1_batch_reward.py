"""An EasyR1 reward file (worker.reward.reward_function=...:compute_score), unchanged.

    RewardSpec("r1v", "rewards/examples/easyr1_batch_reward.py:compute_score", kwargs={"format_weight": 0.1})
"""

import re
from typing import Any

REWARD_TYPE = "batch"


def format_reward(response: str) -> float:
    return 1.0 if re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", response, re.DOTALL) else 0.0


def accuracy_reward(response: str, ground_truth: str) -> float:
    match = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return 1.0 if match and match.group(1).strip().strip("()").rstrip(".") == ground_truth.strip() else 0.0


def compute_score(reward_inputs: list[dict[str, Any]], format_weight: float = 0.1) -> list[dict[str, float]]:
    if not isinstance(reward_inputs, list):
        raise ValueError("Please use `reward_type=batch` for this reward function.")
    scores = []
    for reward_input in reward_inputs:
        fmt = format_reward(reward_input["response"])
        acc = accuracy_reward(reward_input["response"], reward_input["ground_truth"])
        scores.append({"overall": (1 - format_weight) * acc + format_weight * fmt, "format": fmt, "accuracy": acc})
    return scores
