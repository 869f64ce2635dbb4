"""pathorl rewards: a plug-in reward API (built-ins, or verl / EasyR1 / OpenRLHF / TRL reward files
unchanged), the pathology reward suite, and isolated parallel scoring.

    from rewards import RewardInput, RewardSpec, RewardRunner
    with RewardRunner([RewardSpec("format", "patho_r1_format", 0.1),
                       RewardSpec("accuracy", "mc_accuracy", 0.9)]) as runner:
        batch = runner.score(inputs)   # RewardBatch: scores, components, metrics, errors

Check a reward file before a run: `python -m rewards check file.py:fn --rows rows.jsonl --responses r.jsonl`.
"""

from rewards.api import RewardBatch, RewardError, RewardInput, RewardSpec, format_prompt
from rewards.overlong import overlong_penalty
from rewards.registry import BUILTINS, pathreasoner_specs, patho_r1_specs
from rewards.runner import RewardRunner

__all__ = ["BUILTINS", "RewardBatch", "RewardError", "RewardInput", "RewardRunner", "RewardSpec", "format_prompt",
           "overlong_penalty", "pathreasoner_specs", "patho_r1_specs"]
