"""A pathorl-native reward: one RewardInput in (`sample`), a float or {"score", ...metrics} out, or None
when it does not apply. `samples` as the first parameter makes it a batch reward instead.

    RewardSpec("concise", "rewards/examples/native_reward.py:concise_reward", kwargs={"limit": 256})
"""


def concise_reward(sample, limit: int = 256):
    if sample.truncated:
        return {"score": -1.0, "over": 1.0}
    return {"score": 1.0 if sample.response_length <= limit else 0.0, "over": float(sample.response_length > limit)}
