"""An OpenRLHF reward file (--remote_rm_url rewards/examples/openrlhf_reward.py), unchanged.

queries are prompt + response, prompts the prompts, labels the answers (--label_key answer).
    RewardSpec("accuracy", "rewards/examples/openrlhf_reward.py:reward_func")
"""

import re

import torch


def reward_func(queries, prompts, labels, **kwargs):
    rewards = []
    for query, prompt, label in zip(queries, prompts, labels):
        response = query[len(prompt):]
        match = re.search(r"<answer>\s*([A-Z])\s*</answer>", response)
        rewards.append(1.0 if match and match.group(1) == label else 0.0)
    reward = torch.tensor(rewards)
    return {
        "rewards": reward,
        "scores": reward,
        "extra_logs": {"response_chars": torch.tensor([float(len(q) - len(p)) for q, p in zip(queries, prompts)])},
    }
