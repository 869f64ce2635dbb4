"""Evaluation metrics, shared by RL's periodic evaluation and the standalone `launch/eval.py`.

Per validation row: one greedy response and `n` sampled ones, each scored by the run's rewards. A
response is correct when the reward component `correct` (default "accuracy") scores at least
`threshold` (1.0: exactly right); it is well formatted when the component "format" scores > 0
(without one, Patho-R1's `<think>…</think><answer>…</answer>` layout check). Per `data_source` and
overall:

    greedy_accuracy   fraction of rows whose greedy response is correct
    format_rate       fraction of greedy responses that are well formatted
    mean_length       mean greedy response length (tokens)
    mean@n            mean correctness of the n samples (averaged over rows)
    pass@k            unbiased pass@k of Chen et al. 2021 ("Evaluating Large Language Models Trained
                      on Code", eq. 1): 1 − C(n−c, k)/C(n, k) per row, averaged; k = 1, 2, 4, …, n
    maj@n             the majority vote over the n extracted answers is correct (ties: the answer
                      reached first in sample order; samples without an answer do not vote)

verl's validation reports a bootstrap best@k, which is biased low (verl PR #7240); pass@k here is
the unbiased estimator.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rewards.pathology import answer_span, extract_choice, normalize_answer, tagged_layout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021), in the numerically
    stable product form 1 − ∏_{i=n−c+1}^{n} (1 − k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, … up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n >= 1 else []


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@n: is the most frequent extracted answer a correct one? Samples without an answer do not
    vote; a tie goes to the answer reached first in sample order; no answer at all is wrong."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return next(ok for a, ok in zip(answers, correct) if a == winner)


def extract_answer(text: str, options: list[str]) -> str | None:
    """The answer a response gives, for voting: the option letter of a multiple-choice answer, else
    the normalised text of its `<answer>` span (None without one)."""
    span = answer_span(text)
    if span is None:
        return None
    if options:
        return extract_choice(span, options)
    return normalize_answer(span) or None


@dataclass
class RowResult:
    """One validation row's responses, judged."""

    uid: str
    data_source: str
    greedy_correct: bool
    greedy_formatted: bool
    greedy_length: int
    greedy_reward: float | None = None
    greedy_text: str = ""
    greedy_extracted: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    """One per sampled response: {"correct": bool, "extracted": str | None, "text": str}."""


def judge(components: dict[str, list[float | None]], index: int, text: str, correct: str, threshold: float) -> tuple[bool, bool]:
    """(correct, formatted) of response `index` from its reward components (a failed reward: None,
    counts as wrong)."""
    if correct not in components:
        raise KeyError(f"no reward component named {correct!r} to judge correctness (components: {sorted(components)})")
    score = components[correct][index]
    ok = score is not None and score >= threshold - 1e-9
    if "format" in components:
        fmt = components["format"][index]
        formatted = fmt is not None and fmt > 0
    else:
        formatted = tagged_layout(text, ("think", "answer"))
    return ok, formatted


def summarize(rows: list[RowResult], n: int) -> dict[str, dict[str, float]]:
    """{"overall": metrics, "by_source": {source: metrics}} with the metrics of the module docstring
    (the sampled ones only when n > 0)."""
    def metrics(part: list[RowResult]) -> dict[str, float]:
        out = {"rows": float(len(part)),
               "greedy_accuracy": _mean(r.greedy_correct for r in part),
               "format_rate": _mean(r.greedy_formatted for r in part),
               "mean_length": _mean(r.greedy_length for r in part)}
        if n > 0:
            out[f"mean@{n}"] = _mean(_mean(s["correct"] for s in r.samples) for r in part)
            for k in ks_for(n):
                out[f"pass@{k}"] = _mean(pass_at_k(n, sum(s["correct"] for s in r.samples), k) for r in part)
            out[f"maj@{n}"] = _mean(majority_correct([s["extracted"] for s in r.samples],
                                                     [s["correct"] for s in r.samples]) for r in part)
        return out

    sources = sorted({r.data_source for r in rows})
    return {"overall": metrics(rows),
            "by_source": {s: metrics([r for r in rows if r.data_source == s]) for s in sources}}


def flat_metrics(summary: dict[str, dict[str, Any]], prefix: str = "eval/") -> dict[str, float]:
    """A summary as flat metric names: eval/<metric> overall and eval/<source>/<metric> per source."""
    out = {f"{prefix}{k}": v for k, v in summary["overall"].items()}
    for source, values in summary["by_source"].items():
        out.update({f"{prefix}{source or 'unknown'}/{k}": v for k, v in values.items()})
    return out


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per (model, data source) and overall; one column per metric."""
    keys: list[str] = []
    for s in summaries.values():
        keys += [k for k in s["overall"] if k not in keys and k != "rows"]
    lines = ["| model | data_source | rows | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for model, s in summaries.items():
        parts = [("overall", s["overall"])] + sorted(s["by_source"].items())
        for source, values in parts:
            cells = [f"{values[k]:.3f}" if isinstance(values.get(k), float) else "-" for k in keys]
            lines.append(f"| {model} | {source or '-'} | {int(values['rows'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def evaluate_prompts(sampler: Any, prompts: list[Any], n: int, temperature: float, correct: str = "accuracy",
                     threshold: float = 1.0) -> list[RowResult]:
    """Greedy responses, then `n` samples at `temperature`, of every prompt through `sampler`
    (engine/sampler.py: the run's rollout pool and rewards), judged. A row whose generation failed
    is reported by the sampler and left out."""
    greedy = {g.prompt.uid: g for g in sampler.generate(prompts, 1, {"temperature": 0.0}).seen}
    sampled = {g.prompt.uid: g for g in sampler.generate(prompts, n, {"temperature": temperature}).seen} if n else {}
    rows = []
    for p in prompts:
        g, s = greedy.get(p.uid), sampled.get(p.uid)
        if g is None or (n and s is None):
            continue
        ok, formatted = judge(g.components, 0, g.texts[0], correct, threshold)
        row = RowResult(uid=p.uid, data_source=str(p.row.get("data_source") or ""), greedy_correct=ok,
                        greedy_formatted=formatted, greedy_length=len(g.result.samples[0].token_ids),
                        greedy_reward=g.scores[0], greedy_text=g.texts[0],
                        greedy_extracted=extract_answer(g.texts[0], p.row.get("options") or []))
        for i, text in enumerate(s.texts if s else []):
            row.samples.append({"correct": judge(s.components, i, text, correct, threshold)[0],
                                "extracted": extract_answer(text, p.row.get("options") or []), "text": text})
        rows.append(row)
    return rows
