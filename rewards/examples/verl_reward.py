"""A verl-style reward file (custom_reward_function.path / .name = compute_score), unchanged.

    RewardSpec("accuracy", "rewards/examples/verl_reward.py:compute_score")
"""

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    match = re.search(r"<answer>\s*\(?([A-Z])\)?\s*</answer>", solution_str)
    predicted = match.group(1) if match else None
    return {"score": 1.0 if predicted == ground_truth else 0.0, "answered": float(predicted is not None)}
