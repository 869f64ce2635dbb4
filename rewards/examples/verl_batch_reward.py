"""A verl batch-style reward file (reward_manager=batch), unchanged: lists in, a list of floats out.

    RewardSpec("accuracy", "rewards/examples/verl_batch_reward.py:compute_score", chunk_size=8)
"""

import re


def compute_score(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):
    scores = []
    for solution, truth in zip(solution_strs, ground_truths):
        match = re.search(r"<answer>\s*\(?([A-Z])\)?\s*</answer>", solution)
        scores.append(1.0 if match and match.group(1) == truth else 0.0)
    return scores
