"""Reward-function styles: detection from the signature, the call each style expects, and the
conversion of its return value to (score, metrics) per sample. `s` is a RewardInput, `kw` the
RewardSpec's kwargs; the first matching rule decides the style.

- easyr1_sequential / easyr1_batch: the module sets REWARD_TYPE = "sequential" / "batch" (or, without
  it, the first parameter is `reward_input` / `reward_inputs`). Called fn({"response",
  "response_length", "ground_truth"}, **kw) / fn([{...}, ...], **kw); returns {"overall": float,
  ...metrics} (or a float) per sample.
- verl_batch: a parameter `solution_strs`. fn(data_sources=, solution_strs=, ground_truths=,
  extra_infos=, **kw) -> list of float or {"score": float, ...}.
- verl: a parameter `solution_str`. fn(data_source=, solution_str=, ground_truth=, extra_info=, **kw)
  -> float or {"score": float, ...}. ground_truth is the row's `reward_model.ground_truth` as stored
  (a number stays a number) when the row is in verl's schema, else `s.ground_truth`. extra_info is
  the row's `extra_info` column when it has one ({} where it is null, as verl's rl_dataset gives;
  what verl's reward managers pass, e.g. verl/workers/reward_manager/naive.py), else the whole
  dataset row (`s.extra`).
- openrlhf: a parameter `queries`. fn(queries=, prompts=, labels=, **kw) -> list/tensor of rewards,
  or {"rewards": ..., "scores": ..., "extra_logs": {...}}. queries are `s.prompt + s.response` (the
  prompt text without chat template, then the response), prompts `s.prompt`, labels
  `s.ground_truth`; "scores" and extra_logs (per sample, or a scalar for all) become metrics.
- trl: a parameter `completions`. fn(prompts=, completions=, completion_ids=, trainer_state=None,
  **row columns, **kw) -> list of float or None. As TRL's GRPOTrainer does (trl/trainer/
  grpo_trainer.py, `is_conversational`): for a row whose `prompt` is a list of chat messages (verl's
  schema) the prompt is that list and the completion [{"role": "assistant", "content": response}];
  for other rows (TRL's standard format) the prompt is `s.prompt` and the completion `s.response`.
  completion_ids are `s.response_ids`; every other field of the dataset rows ("prompt" and
  "completion" aside, as in TRL) is a keyword holding one value per sample (None where a row lacks
  it; kw wins on a name clash); trainer_state is None (the engine has no HF TrainerState).
- native / native_batch (pathorl): the first parameter is `sample` / `samples`. fn(s, **kw) -> float,
  {"score": float, ...} or None; fn([s, ...], **kw) -> a list of those, where an exception instance in
  a slot fails that sample only.

None means "not applicable" (TRL's convention) for native and trl rewards only, and for trl so does
NaN (TRL stores None as NaN and sums with nansum); elsewhere None is a wrong return type and NaN an
error. Any style may be `async def`. Only finite numbers are kept as metrics.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable

from rewards.api import RewardInput

BATCH_STYLES = {"native_batch", "verl_batch", "easyr1_batch", "openrlhf", "trl"}
SCORE_KEYS = {"native": "score", "native_batch": "score", "verl": "score", "verl_batch": "score",
              "easyr1_sequential": "overall", "easyr1_batch": "overall", "openrlhf": "score"}
NONE_ALLOWED = {"native", "native_batch", "trl"}


class ReturnTypeError(TypeError):
    """A reward returned something that is not a score of its style."""


class NonFiniteScore(ValueError):
    """A reward returned NaN or an infinity."""


def detect_style(fn: Callable[..., Any], module: Any, reference: str) -> str:
    """The style of a reward function (see the module table); a clear error when none fits."""
    reward_type = getattr(module, "REWARD_TYPE", None)
    if reward_type is not None:
        if reward_type not in ("batch", "sequential"):
            raise ValueError(f"reward {reference!r}: REWARD_TYPE must be 'batch' or 'sequential', got {reward_type!r}")
        return f"easyr1_{reward_type}"
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"reward {reference!r}: cannot read the function's signature ({exc})") from None
    first = params[0] if params else ""
    for name, style in (("solution_strs", "verl_batch"), ("solution_str", "verl"), ("queries", "openrlhf"),
                        ("completions", "trl")):
        if name in params:
            return style
    by_first = {"sample": "native", "samples": "native_batch", "reward_input": "easyr1_sequential",
                "reward_inputs": "easyr1_batch"}
    if first in by_first:
        return by_first[first]
    raise ValueError(
        f"reward {reference!r} has parameters {params}, which match no supported style: pathorl "
        "fn(sample, **kw) or fn(samples, **kw); verl compute_score(data_source, solution_str, ground_truth, "
        "extra_info=None, **kw) or its batch form (data_sources, solution_strs, ground_truths, extra_infos); "
        "EasyR1 (module REWARD_TYPE = 'batch'|'sequential'); OpenRLHF reward_func(queries, prompts, labels, **kw); "
        "TRL f(prompts, completions, completion_ids, **kw)")


def _extra_info(s: RewardInput) -> Any:
    if "extra_info" not in s.extra:
        return s.extra
    return {} if s.extra["extra_info"] is None else s.extra["extra_info"]


def _verl_ground_truth(s: RewardInput) -> Any:
    reward_model = s.extra.get("reward_model")
    return reward_model["ground_truth"] if isinstance(reward_model, dict) and "ground_truth" in reward_model \
        else s.ground_truth


def _trl_prompt_and_completion(s: RewardInput) -> tuple[Any, Any]:
    chat = s.extra.get("prompt")
    if isinstance(chat, list):
        return chat, [{"role": "assistant", "content": s.response}]
    return s.prompt, s.response


def _easyr1_input(s: RewardInput) -> dict[str, Any]:
    return {"response": s.response, "response_length": s.response_length, "ground_truth": s.ground_truth}


def invoke(style: str, fn: Callable[..., Any], samples: list[RewardInput], kwargs: dict[str, Any]) -> Any:
    """One call of `fn` in its style: on `samples[0]` for per-sample styles, on all of them for batch
    styles. Returns what `fn` returns (possibly an awaitable)."""
    s = samples[0]
    if style == "native":
        return fn(s, **kwargs)
    if style == "verl":
        return fn(data_source=s.data_source, solution_str=s.response, ground_truth=_verl_ground_truth(s),
                  extra_info=_extra_info(s), **kwargs)
    if style == "easyr1_sequential":
        return fn(_easyr1_input(s), **kwargs)
    if style == "native_batch":
        return fn(list(samples), **kwargs)
    if style == "verl_batch":
        return fn(data_sources=[x.data_source for x in samples], solution_strs=[x.response for x in samples],
                  ground_truths=[_verl_ground_truth(x) for x in samples], extra_infos=[_extra_info(x) for x in samples],
                  **kwargs)
    if style == "easyr1_batch":
        return fn([_easyr1_input(x) for x in samples], **kwargs)
    if style == "openrlhf":
        return fn(queries=[x.prompt + x.response for x in samples], prompts=[x.prompt for x in samples],
                  labels=[x.ground_truth for x in samples], **kwargs)
    if style == "trl":
        reserved = {"prompts", "completions", "completion_ids", "trainer_state", "prompt", "completion"}
        keys = sorted({k for x in samples for k in x.extra} - reserved)
        columns = {k: [x.extra.get(k) for x in samples] for k in keys}
        prompts, completions = zip(*map(_trl_prompt_and_completion, samples))
        return fn(prompts=list(prompts), completions=list(completions), completion_ids=[x.response_ids for x in samples],
                  trainer_state=None, **{**columns, **kwargs})
    raise ValueError(f"unknown reward style {style!r}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, numbers.Real):
        result = float(value)
    elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor or array
        return _number(value.item(), what)
    else:
        raise ReturnTypeError(f"{what} must be a number, got {type(value).__name__}: {value!r:.80}")
    if not math.isfinite(result):
        raise NonFiniteScore(f"{what} is {result}")
    return result


def _as_list(value: Any, n: int, what: str) -> list[Any]:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ReturnTypeError(f"{what} must be a list of {n} values, got {type(value).__name__}: {value!r:.80}")
    if len(value) != n:
        raise ReturnTypeError(f"{what} has {len(value)} values for {n} samples")
    return list(value)


def _metrics(items: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in items.items():
        try:
            out[str(key)] = _number(value, key)
        except (ReturnTypeError, NonFiniteScore):
            continue
    return out


def coerce(style: str, raw: Any) -> tuple[float | None, dict[str, float]]:
    """(score, metrics) from one sample's return value; raises ReturnTypeError or NonFiniteScore."""
    if isinstance(raw, BaseException):
        raise raw
    if style == "trl" and isinstance(raw, float) and math.isnan(raw):
        raw = None  # TRL turns None into NaN and skips NaN (nansum): the two mean the same there
    if raw is None:
        if style in NONE_ALLOWED:
            return None, {}
        raise ReturnTypeError("returned None (only pathorl and TRL rewards may return None for 'not applicable')")
    if isinstance(raw, dict) and style in SCORE_KEYS:
        key = SCORE_KEYS[style]
        if key not in raw:
            raise ReturnTypeError(f"returned a dict without the score key {key!r}: keys {sorted(raw)}")
        if raw[key] is None and style in NONE_ALLOWED:
            return None, _metrics({k: v for k, v in raw.items() if k != key})
        return _number(raw[key], f"score {key!r}"), _metrics({k: v for k, v in raw.items() if k != key})
    return _number(raw, "score"), {}


def split_batch(style: str, raw: Any, n: int) -> list[Any]:
    """One return value per sample from a batch call's return value (to be passed to `coerce`)."""
    if style == "openrlhf":
        if not isinstance(raw, dict):
            return _as_list(raw, n, "OpenRLHF rewards")
        if "rewards" not in raw:
            raise ReturnTypeError(f"OpenRLHF reward returned a dict without 'rewards': keys {sorted(raw)}")
        rewards = _as_list(raw["rewards"], n, "OpenRLHF 'rewards'")
        extras = dict(raw.get("extra_logs") or {})
        if raw.get("scores") is not None:
            extras["scores"] = raw["scores"]
        columns = {}
        for key, value in extras.items():
            is_sequence = isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0
            columns[key] = _as_list(value, n, f"extra_logs[{key!r}]") if is_sequence else [value] * n
        return [{"score": r, **{k: col[i] for k, col in columns.items()}} for i, r in enumerate(rewards)]
    return _as_list(raw, n, f"{style} reward's result")

