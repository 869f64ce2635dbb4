"""An EasyR1 sequential reward file (one dict in, one dict out), unchanged.

    RewardSpec("dapo", "rewards/examples/easyr1_sequential_reward.py:compute_score",
               kwargs={"max_response_length": 2048, "overlong_buffer_length": 512})
"""

import re
from typing import Any

REWARD_TYPE = "sequential"


def compute_score(reward_input: dict[str, Any], max_response_length: int = 2048,
                  overlong_buffer_length: int = 512) -> dict[str, float]:
    if not isinstance(reward_input, dict):
        raise ValueError("Please use `reward_type=sequential` for this reward function.")
    match = re.search(r"<answer>\s*([A-Z])\s*</answer>", reward_input["response"])
    accuracy = 1.0 if match and match.group(1) == reward_input["ground_truth"] else -1.0
    expected = max_response_length - overlong_buffer_length
    length = reward_input["response_length"]
    if length <= expected:
        overlong = 0.0
    elif length <= max_response_length:
        overlong = (expected - length) / overlong_buffer_length
    else:
        overlong = -1.0
    return {"overall": accuracy + overlong, "accuracy": accuracy, "overlong": overlong}
