"""TRL reward functions (GRPOTrainer(reward_funcs=[...])), unchanged: dataset columns arrive as
keyword lists; None marks a sample a reward does not apply to; async functions are allowed.

    RewardSpec("choice", "rewards/examples/trl_reward.py:choice_reward")
    RewardSpec("length", "rewards/examples/trl_reward.py:length_reward")
"""

import asyncio
import re


def choice_reward(prompts, completions, completion_ids, answer, options=None, **kwargs):
    rewards = []
    for completion, truth, opts in zip(completions, answer, options or [None] * len(completions)):
        if not opts:
            rewards.append(None)  # open-ended row: this reward does not apply
            continue
        match = re.search(r"<answer>\s*([A-Z])\s*</answer>", completion)
        rewards.append(1.0 if match and match.group(1) == truth else 0.0)
    return rewards


async def length_reward(prompts, completions, completion_ids, **kwargs):
    await asyncio.sleep(0)
    return [-abs(64 - len(ids)) / 64 for ids in completion_ids]
