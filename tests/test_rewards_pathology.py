"""Built-in pathology rewards on hand-written cases (in-process; no worker pool)."""

import json

import pytest

from rewards import RewardInput, overlong_penalty
from rewards.entities import LEXICON_PATH, entity_dice, lexicon, soft_dice
from rewards.judge import parse_judge_score, reference_answer
from rewards.pathology import (extract_choice, mc_accuracy, open_exact_match, open_token_f1, patho_r1,
                               patho_r1_dapo, patho_r1_format, pathreasoner_format, token_f1, yes_no_accuracy)

OPTIONS = ["Tubular adenoma", "Invasive adenocarcinoma", "Hyperplastic polyp", "Normal colonic mucosa"]


def mc(response, answer="B", options=OPTIONS, length=100):
    row = {"id": "r", "question": "What is the diagnosis?", "options": options, "answer": answer}
    return RewardInput.from_row(0, row, response, response_length=length)


def test_prompt_and_fields_follow_the_row():
    sample = mc("x")
    assert sample.prompt == ("What is the diagnosis?\nA. Tubular adenoma\nB. Invasive adenocarcinoma\n"
                             "C. Hyperplastic polyp\nD. Normal colonic mucosa")
    assert sample.ground_truth == "B" and sample.extra["options"] == OPTIONS
    with pytest.raises(ValueError, match="'answer'"):
        RewardInput.from_row(0, {"id": "bad", "question": "q"}, "x")


@pytest.mark.parametrize("response, expected", [
    ("<think>glands invade</think><answer>B</answer>", 1.0),
    ("  <think>a</think>\n\n<answer>B</answer>\n", 1.0),
    ("<think>a</think><answer>B</answer> trailing words", 0.0),
    ("preamble <think>a</think><answer>B</answer>", 0.0),
    ("<answer>B</answer><think>a</think>", 0.0),
    ("<think>a</think><answer>B</answer><answer>C</answer>", 0.0),
    ("<think>a <think>b</think></think><answer>B</answer>", 0.0),
    ("<think>a <answer>C</answer></think><answer>B</answer>", 0.0),
    ("<think>   </think><answer>B</answer>", 0.0),
    ("<think>a</think><answer>B", 0.0),
    ("B", 0.0),
])
def test_patho_r1_format(response, expected):
    assert patho_r1_format(mc(response)) == expected


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("b", "B"), ("B)", "B"), ("(B)", "B"), ("[B]", "B"), ("B.", "B"), ("**B**", "B"),
    ("Option B", "B"), ("option: B", "B"), ("The correct answer is (B).", "B"), ("Answer: B", "B"),
    ("B. Invasive adenocarcinoma", "B"), ("(B) Invasive adenocarcinoma", "B"), ("B) it invades", "B"),
    ("invasive  ADENOCARCINOMA.", "B"), ("Tubular adenoma", "A"),
    ("B. Tubular adenoma", None),  # the letter contradicts the text
    ("A, B", None), ("A and B", None), ("AB", None), ("B or C", None), ("E", None),
    ("adenocarcinoma", None), ("", None),
])
def test_extract_choice(answer, letter):
    assert extract_choice(answer, OPTIONS) == letter


@pytest.mark.parametrize("response, expected", [
    ("<think>x</think><answer>B</answer>", 1.0),
    ("<think>x</think><answer>Option B</answer>", 1.0),
    ("<think>x</think><answer>Invasive adenocarcinoma</answer>", 1.0),
    ("<think>x</think><answer>A</answer>", 0.0),
    ("<think>x</think><answer>B, C</answer>", 0.0),
    ("<think>the answer is B</think>", 0.0),  # answer outside <answer>
    ("<think>x</think> B <answer></answer>", 0.0),
    ("<answer>A</answer><answer>B</answer>", 0.0),  # repeated answer spans: no pick
    ("<think>x</think><answer>B</answer> trailing", 1.0),  # accuracy reads the span; format punishes
])
def test_mc_accuracy(response, expected):
    assert mc_accuracy(mc(response)) == expected


@pytest.mark.parametrize("options, answer, letter", [
    # option texts that begin like a letter: the exact text wins, never the leading capital
    (["C. difficile colitis", "H. pylori gastritis", "Crohn disease"], "C. difficile colitis", "A"),
    (["C. difficile colitis", "H. pylori gastritis", "Crohn disease"], "h. pylori gastritis.", "B"),
    (["C. difficile colitis", "H. pylori gastritis", "Crohn disease"], "C", "C"),
    (["I", "II", "III", "IV"], "I", "A"), (["I", "II", "III", "IV"], "IV", "D"), (["I", "II", "III", "IV"], "B", "B"),
    # a lower-case letter with text counts only when the text is that option's
    (OPTIONS, "b. invasive adenocarcinoma", "B"), (OPTIONS, "b. carcinoma", None), (OPTIONS, "i.e. adenoma", None),
    (OPTIONS, "Ｂ", "B"), (OPTIONS, "（B）", "B"),  # full-width forms (NFKC)
])
def test_extract_choice_option_texts_first(options, answer, letter):
    assert extract_choice(answer, options) == letter


def test_ground_truth_may_be_option_text_and_must_be_valid():
    assert mc_accuracy(mc("<answer>B</answer>", answer="Invasive adenocarcinoma")) == 1.0
    with pytest.raises(ValueError, match="neither an option letter"):
        mc_accuracy(mc("<answer>B</answer>", answer="Carcinoid"))


def test_patho_r1_combination_and_dapo():
    good, unformatted, wrong = (mc("<think>x</think><answer>B</answer>"), mc("<answer>B</answer>"),
                                mc("<think>x</think><answer>C</answer>"))
    assert patho_r1(good)["score"] == pytest.approx(1.0)
    assert patho_r1(unformatted) == pytest.approx({"score": 0.9, "format": 0.0, "accuracy": 1.0})
    assert patho_r1(wrong) == pytest.approx({"score": 0.1, "format": 1.0, "accuracy": 0.0})
    assert mc_accuracy(wrong, incorrect=-1.0) == -1.0
    # L_max 100, L_c 20: no penalty up to 80, -0.5 at 90, -1 at 100, -factor beyond.
    assert patho_r1_dapo(mc(good.response, length=80), 100, 20) == {"score": 1.0, "accuracy": 1.0, "overlong": 0.0}
    assert patho_r1_dapo(mc(good.response, length=90), 100, 20)["score"] == pytest.approx(0.5)
    assert patho_r1_dapo(mc(wrong.response, length=150), 100, 20, 0.5)["score"] == pytest.approx(-1.5)


def test_overlong_penalty_formula():
    assert [overlong_penalty(n, 100, 20) for n in (0, 80, 81, 90, 100, 101)] == \
        pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0, -1.0])
    assert overlong_penalty(95, 100, 20, factor=2.0) == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(10, 100, 0)


def open_ended(response, answer):
    return RewardInput.from_row(0, {"id": "o", "question": "q", "answer": answer}, response)


def test_open_ended_exact_and_f1():
    her2 = open_ended("<answer>The HER2-positive carcinoma.</answer>", "her2 positive carcinoma")
    assert open_exact_match(her2) == 1.0
    assert open_exact_match(open_ended("<answer>carcinoma</answer>", "adenocarcinoma")) == 0.0
    assert open_exact_match(open_ended("carcinoma", "carcinoma")) == 0.0  # no <answer> span
    assert open_exact_match(open_ended("carcinoma", "carcinoma"), tagged=False) == 1.0
    # pred "squamous cell carcinoma" vs gold "small cell carcinoma": 2 common of 3 and 3 -> P = R = 2/3.
    assert open_token_f1(open_ended("<answer>squamous cell carcinoma</answer>", "small cell carcinoma")) == \
        pytest.approx(2 / 3)
    assert token_f1("a an the", "") == 1.0 and token_f1("x", "y") == 0.0


@pytest.mark.parametrize("answer, truth, expected", [
    ("Yes", "yes", 1.0), ("No.", "no", 1.0), ("yes, the margin is involved", "Yes", 1.0),
    ("No", "yes", 0.0), ("yes or no", "yes", 0.0), ("maybe", "no", 0.0),
])
def test_yes_no(answer, truth, expected):
    assert yes_no_accuracy(open_ended(f"<answer>{answer}</answer>", truth)) == expected


def test_yes_no_rejects_open_ground_truth():
    with pytest.raises(ValueError, match="yes/no ground truth"):
        yes_no_accuracy(open_ended("<answer>yes</answer>", "adenoma"))


@pytest.mark.parametrize("response, expected", [
    ("<observe>glands</observe>\n<think>invasive</think>\n<answer>B</answer>", 1.0),
    ("<observe>glands</observe><think>x</think><answer>B</answer>", 1.0),
    ("<think>x</think><observe>glands</observe><answer>B</answer>", 0.0),
    ("<observe>glands</observe><answer>B</answer>", 0.0),
    ("<observe>a</observe><observe>b</observe><think>x</think><answer>B</answer>", 0.0),
    ("<observe>a</observe><think>x</think><answer>B</answer>extra", 0.0),
])
def test_pathreasoner_format(response, expected):
    assert pathreasoner_format(mc(response)) == expected


def test_lexicon_records_source_and_licence():
    data = json.loads(LEXICON_PATH.read_text())
    assert "digital-registrar==0.2.0b4" in data["header"]["source"]
    assert data["header"]["licence_text"].startswith("MIT License")
    categories = {e["category"] for e in data["entities"]}
    assert {"histology", "biomarker", "organ", "stain", "site"} <= categories


def test_lexicon_matching():
    found = lexicon().find("Mucinous adenocarcinomas with ER positivity; the er is; HER-2 and Ki-67; PD-L1; "
                           "lymphovascular invasion")
    assert found == {"mucinous adenocarcinoma", "er", "her2", "ki67", "pdl1", "lymphovascular invasion"}
    assert lexicon().canonical("PD-L1") == "pdl1" and lexicon().canonical("Unknown Thing") == "unknown thing"


def test_soft_dice_by_hand():
    # exact: {er}; soft: squamous~small cell carcinoma (head noun). I = 1 + 0.5; |P| + |G| = 3 + 2.
    assert soft_dice({"er", "small cell carcinoma", "necrosis"}, {"er", "squamous cell carcinoma"}) == \
        {"score": pytest.approx(2 * 1.5 / 5), "exact": 1.0, "soft": 1.0}
    assert soft_dice(set(), set())["score"] == 1.0
    assert soft_dice({"a"}, set())["score"] == 0.0
    # one-to-one: two predictions cannot both soft-match one truth.
    assert soft_dice({"small cell carcinoma", "large cell carcinoma"}, {"squamous cell carcinoma"})["soft"] == 1.0


def entity_sample(response, entities):
    row = {"id": "e", "question": "q", "answer": "x"}
    if entities is not None:
        row["entities"] = entities
    return RewardInput.from_row(0, row, response)


def test_entity_dice_reads_observe_and_think_only():
    response = ("<observe>Glands with necrotic debris and foo bar cells</observe>"
                "<think>Mucinous adenocarcinoma, ER positive</think><answer>necrosis ki67 PAS</answer>")
    result = entity_dice(entity_sample(response, ["adenocarcinoma", "ER", "Necrosis", "foo bar"]))
    # predicted {gland formation, necrosis, foo bar, mucinous adenocarcinoma, er}; exact 3; soft 1 -> 2*3.5/9.
    assert result == {"score": pytest.approx(7 / 9), "exact": 3.0, "soft": 1.0, "predicted": 5.0}
    assert entity_dice(entity_sample(response, None)) is None
    assert entity_dice(entity_sample("no tags here: necrosis", ["necrosis"]))["score"] == 0.0


def test_judge_score_parsing():
    cases = {"Score: 0.8": 0.8, "score = 4/5": 0.8, "Score: 80%": 0.8, "**Score**: 1": 1.0,
             "It is right, 4 out of 5": 0.8, "0.3": 0.3, "<think>Score: 0.1</think>Score: 0.9": 0.9,
             "Score: 0.5, final score: 1.0": 1.0, "Score: 7": None, "7": None, "no idea": None, "Score: 2/0": None,
             "Score: 1, as the diagnoses agree": 1.0,
             "Score: 0,8": None, "Score: 1e-1": None}  # a decimal comma, an exponent: refused, not read as 0 or 1
    assert {text: parse_judge_score(text) for text in cases} == pytest.approx(cases)
    assert reference_answer(mc("x")) == "B. Invasive adenocarcinoma"
