"""The reward API's data types: what a reward receives, how rewards are configured, what comes back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ERROR_KINDS = ("exception", "timeout", "nan", "type")


@dataclass
class RewardInput:
    """One sample to score. Rewards must treat every field as read-only."""

    index: int
    """Position of the sample in the scored batch; unique within one `RewardRunner.score` call."""
    response: str
    """The decoded response, special tokens skipped."""
    response_ids: list[int]
    """The response's token ids as the policy sampled them (no padding)."""
    prompt: str
    """The text shown to the model: the question, then one "A. option" line per option."""
    ground_truth: str
    """The row's `answer`: an option letter for multiple choice, else the answer text."""
    extra: dict[str, Any]
    """The whole dataset row (images, question, options, answer, data_source, entities, ...). It is
    pickled to the reward workers: keep image paths here, not decoded images."""
    response_length: int
    """Number of response tokens (the length DAPO's overlong shaping uses)."""
    truncated: bool
    """True when generation stopped at the token limit rather than at an end-of-sequence token."""
    data_source: str
    """The row's `data_source` (the dataset a row came from)."""

    @classmethod
    def from_row(cls, index: int, row: dict[str, Any], response: str, response_ids: list[int] | None = None,
                 response_length: int | None = None, truncated: bool = False) -> RewardInput:
        """Builds the input for one response to a dataset row in the engine's jsonl schema.

        `response_length` defaults to `len(response_ids)` when ids are given, else to the number of
        whitespace-separated words of `response` (an approximation for tools without a tokenizer).
        """
        row_id = row.get("id", f"#{index}")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"dataset row {row_id!r}: field {key!r} must be a string, got {row.get(key)!r}")
        options = row.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError(f"dataset row {row_id!r}: field 'options' must be a list of strings, got {options!r}")
        if len(options) > 26:
            raise ValueError(f"dataset row {row_id!r}: {len(options)} options, at most 26 (A-Z) are supported")
        ids = list(response_ids) if response_ids is not None else []
        if response_length is None:
            response_length = len(ids) if response_ids is not None else len(response.split())
        return cls(index=index, response=response, response_ids=ids, prompt=format_prompt(row["question"], options),
                   ground_truth=row["answer"], extra=row, response_length=response_length, truncated=truncated,
                   data_source=str(row.get("data_source", "")))


def format_prompt(question: str, options: list[str]) -> str:
    """The question followed by one "A. option" line per option (Patho-R1's user turn, image aside)."""
    lines = [question] + [f"{chr(ord('A') + k)}. {text}" for k, text in enumerate(options)]
    return "\n".join(lines)


@dataclass
class RewardSpec:
    """One reward component of a run's reward: sum over specs of `weight * score`."""

    name: str
    """Component name: metrics are logged as `reward/<name>`; must be unique within a runner."""
    fn: str
    """A built-in reward's name (see `rewards.registry.BUILTINS`) or "path/to/file.py:function"
    (relative to the current directory or absolute) in any supported style (see `rewards.compat`)."""
    weight: float = 1.0
    """Multiplier of this component in the summed score (0 logs a component without training on it)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the function on every call (e.g. `max_length` for overlong shaping)."""
    chunk_size: int | None = None
    """Batch-style rewards only: samples per call. None gives the whole batch to one call (needed by
    rewards that compare samples of a group); a multiple of the group size splits the batch across
    workers. Per-sample rewards are always spread over the workers."""
    timeout_s: float | None = None
    """Per-call time limit overriding the runner's `timeout_s` (a batch call counts as one call)."""

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"RewardSpec.name must be a non-empty string without '/', got {self.name!r}")
        if not isinstance(self.fn, str) or not self.fn:
            raise ValueError(f"RewardSpec {self.name!r}: fn must be a built-in name or 'file.py:function', "
                             f"got {self.fn!r}")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"RewardSpec {self.name!r}: weight must be finite, got {self.weight!r}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"RewardSpec {self.name!r}: kwargs must be a dict, got {type(self.kwargs).__name__}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"RewardSpec {self.name!r}: chunk_size must be >= 1 or None, got {self.chunk_size}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"RewardSpec {self.name!r}: timeout_s must be > 0 or None, got {self.timeout_s}")


class RewardError(Exception):
    """A reward failed on one sample. Recorded in `RewardBatch.errors`; raised when on_error="raise"."""

    def __init__(self, reward: str, index: int, message: str, kind: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"RewardError kind must be one of {ERROR_KINDS}, got {kind!r}")
        super().__init__(reward, index, message, kind)
        self.reward = reward
        """The failing spec's name."""
        self.index = index
        """The sample's `RewardInput.index`."""
        self.message = message
        """What went wrong, with the exception type and the user code's line where there is one."""
        self.kind = kind
        """One of "exception", "timeout", "nan" (NaN or inf score), "type" (wrong return type)."""

    def __str__(self) -> str:
        return f"reward {self.reward!r} failed on sample {self.index} ({self.kind}): {self.message}"


@dataclass
class RewardBatch:
    """Scores of one `RewardRunner.score` call, aligned with its inputs (position k = inputs[k])."""

    scores: list[float | None]
    """Weighted sum per sample; None when the sample is excluded (an error under on_error="exclude",
    or no reward applied to it)."""
    components: dict[str, list[float | None]]
    """Each spec's score per sample; None where that reward failed (on_error="exclude") or returned None
    (not applicable). Under on_error="fallback" a failed entry holds the fallback score."""
    metrics: dict[str, list[float | None]]
    """Extra values from dict returns, keyed "<spec name>/<key>"; None where a sample has none."""
    errors: list[RewardError]
    """Every failure, in the order they were seen."""
    call_seconds: dict[str, float]
    """Per spec: seconds spent inside the reward's calls, summed over workers."""
    elapsed_s: float
    """Wall time of the whole `score` call."""

    def summary(self) -> dict[str, float]:
        """Means over the samples that have a value: `reward/score`, `reward/<name>`,
        `reward/<name>/<key>` for extra metrics, and `reward/errors` (the error count)."""
        out = {"reward/errors": float(len(self.errors))}
        columns = {"score": self.scores, **self.components, **self.metrics}
        for key, values in columns.items():
            present = [v for v in values if v is not None]
            if present:
                out[f"reward/{key}"] = sum(present) / len(present)
        return out
