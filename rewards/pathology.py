"""Rule-based pathology rewards: Patho-R1 format and multiple-choice accuracy (0.1/0.9 and DAPO +-1),
open-ended and yes/no answers (PathVQA-style), and the PathReasoner format.

Every reward here takes one `RewardInput` (`sample`) and returns a float or a dict with "score".
Answers are read from the `<answer>` span only: the response must hold exactly one `<answer>` and
one `</answer>`, in that order; otherwise the answer is missing and scores 0 (no credit for an
answer written outside the tags, nor for a choice among several answer spans).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

from rewards.api import RewardInput
from rewards.overlong import overlong_penalty

LETTERS = string.ascii_uppercase


def tagged_layout(text: str, tags: tuple[str, ...]) -> bool:
    """True if `text` is exactly `<t1>...</t1> <t2>...</t2> ...` for `tags`, in order, each tag pair
    exactly once, each body non-blank, and only whitespace between and around the blocks."""
    for tag in tags:
        if text.count(f"<{tag}>") != 1 or text.count(f"</{tag}>") != 1:
            return False
    pattern = r"\s*" + r"\s*".join(rf"<{tag}>(.*?)</{tag}>" for tag in tags) + r"\s*"
    match = re.fullmatch(pattern, text, flags=re.DOTALL)
    return match is not None and all(body.strip() for body in match.groups())


def answer_span(text: str) -> str | None:
    """The stripped body of the single `<answer>...</answer>` span, or None when there is not
    exactly one `<answer>` and one `</answer>` with the opening tag first."""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    start, end = text.index("<answer>") + len("<answer>"), text.index("</answer>")
    return text[start:end].strip() if start <= end else None


def _answer_text(sample: RewardInput, tagged: bool) -> str | None:
    return answer_span(sample.response) if tagged else sample.response.strip()


# --- multiple choice ------------------------------------------------------------------------------

_DECORATION = " \t\n\r*_`\"'"
_PREFIX = r"(?i:(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:option|answer|choice)(?:\s+is)?\s*[:\-]?\s*)?"
_LETTER_ONLY = re.compile(_PREFIX + r"(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])[.):]?)")
_LETTER_TEXT = re.compile(_PREFIX + r"(?:[(\[]([A-Za-z])[)\]]\s*[.:]?|([A-Za-z])[.):])\s*(\S.*)", flags=re.DOTALL)


def _option_key(text: str) -> str:
    """Case-, whitespace- and trailing-punctuation-insensitive form of an option's text."""
    return " ".join(text.strip(_DECORATION).rstrip(".").split()).casefold()


def extract_choice(answer: str, options: list[str]) -> str | None:
    """The option letter an answer designates, or None when it designates none or several.

    Accepted, in this order: the exact text of one option (case, whitespace and a final period
    ignored; first, so an option such as "C. difficile colitis" or "I" is never read as a letter); a
    letter alone or decorated ("B", "b", "B)", "(B)", "[B]", "B.", "**B**"), behind
    "Option"/"Answer"/"Choice"/"The correct answer is"; a letter followed by text ("B. Adenoma",
    "(B) Adenoma"; a lower-case letter only when the text is its option's, so "i.e. …" is no
    letter), unless the text is exactly another option's text. With options, the letter must be one
    of theirs. Anything else ("A, B", "A and B", "AB", free text) is None. Full-width forms count as
    their ASCII ones (NFKC).
    """
    valid = LETTERS[:len(options)] if options else LETTERS
    text = unicodedata.normalize("NFKC", answer).strip(_DECORATION).rstrip(".").strip(_DECORATION)
    keys = [_option_key(o) for o in options]
    hits = [LETTERS[k] for k, key in enumerate(keys) if key == _option_key(text)]
    if len(hits) == 1:
        return hits[0]
    match = _LETTER_ONLY.fullmatch(text)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
        return letter if letter in valid else None
    match = _LETTER_TEXT.fullmatch(text)
    if match:
        raw = match.group(1) or match.group(2)
        letter, said = raw.upper(), _option_key(match.group(3))
        if letter not in valid:
            return None
        if raw.islower() and not (options and keys[LETTERS.index(letter)] == said):
            return None  # "b. carcinoma" only when it is option B's text: "i.e. …" is no letter
        contradicts = any(key == said and LETTERS[k] != letter for k, key in enumerate(keys))
        return None if contradicts else letter
    return None


def ground_truth_letter(sample: RewardInput) -> str:
    """The correct option letter of a multiple-choice row (its `answer`: a letter or an option's text)."""
    options = sample.extra.get("options") or []
    letter = extract_choice(sample.ground_truth, options)
    if letter is None:
        raise ValueError(f"sample {sample.index}: ground truth {sample.ground_truth!r} is neither an option "
                         f"letter nor the text of one of the {len(options)} options")
    return letter


def mc_correct(sample: RewardInput) -> bool:
    answer = answer_span(sample.response)
    truth = ground_truth_letter(sample)
    return answer is not None and extract_choice(answer, sample.extra.get("options") or []) == truth


def patho_r1_format(sample: RewardInput) -> float:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (one of each, in order, non-blank,
    whitespace only outside), else 0.0."""
    return 1.0 if tagged_layout(sample.response, ("think", "answer")) else 0.0


def mc_accuracy(sample: RewardInput, incorrect: float = 0.0) -> float:
    """1.0 if the `<answer>` span designates the correct option (see `extract_choice`), else
    `incorrect` (0.0; -1.0 gives DAPO's +-1 accuracy)."""
    return 1.0 if mc_correct(sample) else float(incorrect)


def patho_r1(sample: RewardInput, format_weight: float = 0.1) -> dict[str, float]:
    """Patho-R1's GRPO reward: format_weight * format + (1 - format_weight) * accuracy (0.1 / 0.9)."""
    fmt, acc = patho_r1_format(sample), mc_accuracy(sample)
    return {"score": format_weight * fmt + (1.0 - format_weight) * acc, "format": fmt, "accuracy": acc}


def patho_r1_dapo(sample: RewardInput, max_length: int, buffer: int, factor: float = 1.0) -> dict[str, float]:
    """Patho-R1's DAPO reward: +1 correct / -1 otherwise, plus `overlong_penalty` of the response length."""
    acc = 1.0 if mc_correct(sample) else 0.0
    penalty = overlong_penalty(sample.response_length, max_length, buffer, factor)
    return {"score": 2.0 * acc - 1.0 + penalty, "accuracy": acc, "overlong": penalty}


def overlong(sample: RewardInput, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's overlong shaping as a reward component (see `overlong_penalty`)."""
    return overlong_penalty(sample.response_length, max_length, buffer, factor)


# --- open-ended and yes/no ------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]|_")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    """PathVQA/SQuAD-style normal form: lower case, punctuation replaced by spaces (so "HER2-positive"
    equals "HER2 positive"), articles a/an/the removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def token_f1(prediction: str, truth: str) -> float:
    """F1 of the bag-of-words overlap of the normalised texts (1.0 if both are empty)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def open_exact_match(sample: RewardInput, tagged: bool = True) -> float:
    """1.0 if the answer equals the ground truth after `normalize_answer`, else 0.0. `tagged=False`
    reads the whole response instead of the `<answer>` span."""
    answer = _answer_text(sample, tagged)
    return float(answer is not None and normalize_answer(answer) == normalize_answer(sample.ground_truth))


def open_token_f1(sample: RewardInput, tagged: bool = True) -> float:
    """Token F1 between the answer and the ground truth (see `token_f1`); 0.0 without an answer."""
    answer = _answer_text(sample, tagged)
    return 0.0 if answer is None else token_f1(answer, sample.ground_truth)


def yes_no(text: str) -> str | None:
    """"yes" or "no" when the normalised text starts with that word and never uses the other one
    ("Yes.", "no, it is benign"); None otherwise ("yes or no", "maybe")."""
    words = normalize_answer(text).split()
    if words and words[0] in ("yes", "no"):
        other = "no" if words[0] == "yes" else "yes"
        return None if other in words else words[0]
    return None


def yes_no_accuracy(sample: RewardInput, tagged: bool = True) -> float:
    """1.0 if the answer's yes/no (see `yes_no`) equals the ground truth's, else 0.0."""
    truth = normalize_answer(sample.ground_truth)
    if truth not in ("yes", "no"):
        raise ValueError(f"sample {sample.index}: yes/no ground truth expected, got {sample.ground_truth!r}")
    answer = _answer_text(sample, tagged)
    return float(answer is not None and yes_no(answer) == truth)


# --- PathReasoner ---------------------------------------------------------------------------------

def pathreasoner_format(sample: RewardInput) -> float:
    """1.0 for exactly `<observe>...</observe> <think>...</think> <answer>...</answer>` (one of each,
    in order, non-blank, whitespace only between and around), else 0.0."""
    return 1.0 if tagged_layout(sample.response, ("observe", "think", "answer")) else 0.0
