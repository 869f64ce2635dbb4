"""Evaluation metrics against hand-derived values and brute-force enumeration."""

import itertools
from fractions import Fraction
from math import comb

import pytest

from engine.evaluate import (RowResult, extract_answer, flat_metrics, ks_for, majority_correct, markdown_table,
                             pass_at_k, summarize)


def test_pass_at_k_hand_cases():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)          # 1 − C(3,2)/C(4,2)
    assert pass_at_k(8, 3, 4) == pytest.approx(1 - comb(5, 4) / comb(8, 4))
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_pass_at_k_equals_enumeration_over_subsets():
    """pass@k is the probability that a uniformly drawn k-subset of the n samples holds a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(correct, k))
                exact = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_majority_vote():
    assert majority_correct(["A", "B", "A"], [True, False, True])
    assert not majority_correct(["B", "A", "B", None, None], [False, True, False, False, False])
    assert majority_correct(["A", "B"], [True, False])                  # tie: first reached wins
    assert not majority_correct(["B", "A"], [False, True])
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, "C", None], [False, True, False])    # no-answer samples do not vote


def test_extracted_answers():
    assert extract_answer("<think>x</think><answer>B. H&E</answer>", ["IHC", "H&E"]) == "B"
    assert extract_answer("<think>x</think><answer>ihc</answer>", ["IHC", "H&E"]) == "A"
    assert extract_answer("no tags", ["IHC"]) is None
    assert extract_answer("<answer>The Adenoma.</answer>", []) == "adenoma"


def _row(uid, source, greedy, correct, answers):
    return RowResult(uid=uid, data_source=source, greedy_correct=greedy, greedy_formatted=True, greedy_length=10,
                     samples=[{"correct": c, "extracted": a, "text": ""} for c, a in zip(correct, answers)])


def test_summary_by_source_and_overall():
    rows = [_row("1", "a", True, [True, False, False, False], ["A", "B", "B", "C"]),
            _row("2", "a", False, [False, False, False, False], ["B", "B", None, None]),
            _row("3", "b", True, [True, True, True, False], ["A", "A", "A", "C"])]
    s = summarize(rows, 4)
    assert ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6]
    overall = s["overall"]
    assert overall["greedy_accuracy"] == pytest.approx(2 / 3)
    assert overall["mean@4"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert overall["pass@1"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert overall["pass@2"] == pytest.approx((0.5 + 0 + 1.0) / 3)
    assert overall["pass@4"] == pytest.approx(2 / 3)
    assert overall["maj@4"] == pytest.approx(1 / 3)                     # row 1 votes B (wrong), row 3 A (right)
    assert s["by_source"]["a"]["rows"] == 2 and s["by_source"]["b"]["pass@2"] == 1.0
    flat = flat_metrics(s)
    assert flat["eval/pass@4"] == overall["pass@4"] and flat["eval/b/maj@4"] == 1.0
    table = markdown_table({"base": s, "rl": s})
    assert table.count("| base |") == 3 and "pass@2" in table.splitlines()[0]


def test_run_summary_windows_are_disjoint_in_short_runs():
    """launch/summarize_run.py: the first and last windows never share a step, so a 4-step run whose
    reward rose from 0.2 to 0.8 shows the rise (they overlapped, and its gain was 0)."""
    from launch.summarize_run import summarize as summarize_run

    rows = [{"stage": "rl", "step": s, "reward/mean": r} for s, r in enumerate((0.2, 0.4, 0.6, 0.8), 1)]
    out = summarize_run(rows)
    assert out["reward/mean"] == {"first": pytest.approx(0.3), "last": pytest.approx(0.7)}
    assert out["reward_gain"] == pytest.approx(0.4)
    long_run = [{"stage": "rl", "step": s, "reward/mean": float(s)} for s in range(1, 21)]
    assert summarize_run(long_run)["reward_gain"] == pytest.approx(18.0 - 3.0)
