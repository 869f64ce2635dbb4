"""PathReasoner's entity reward: soft Dice between the pathology entities a response names in its
`<observe>` and `<think>` blocks and the row's ground-truth `entities`.

Entities. The lexicon is rewards/data/pathology_lexicon.json (built by
launch/build_pathology_lexicon.py from the `digital-registrar` report schemas; its header records
source and licence). Each lexicon entry has a canonical name and surface forms: a lower-case form
matches case-insensitively on text normalised like the form (hyphens, underscores and slashes as
spaces, whitespace collapsed), with an optional plural "s"/"es"; a form with an upper-case letter
(an acronym such as "ER") matches case-sensitively as written. Matches are whole words, longest
first, non-overlapping, so "mucinous adenocarcinoma" is one entity, not two.
A ground-truth entity is its lexicon canonical name when it is one of the lexicon's surface forms,
else its own normalised text; such out-of-lexicon entities are also searched for verbatim in the
response, so every ground-truth entity can be found.

Score. E_pred = entities found in the `<observe>` and `<think>` bodies, E_gt = the row's entities,
both as sets. Exact hit: the same entity in both. Soft hit (PathReasoner's similarity hit), found
after the exact hits, one-to-one: a remaining ground-truth entity and a remaining predicted one that
share their head noun (last word, plural "s" removed; "small cell carcinoma" ~ "squamous cell
carcinoma") or whose word sets have Jaccard similarity >= 0.5. Pairs are taken greedily by highest
Jaccard, then alphabetically. I_soft = exact + 0.5 * soft;
R_entity = min(1, 2 * I_soft / (|E_pred| + |E_gt|)), 1.0 when both sets are empty.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from rewards.api import RewardInput

LEXICON_PATH = Path(__file__).resolve().parent / "data" / "pathology_lexicon.json"
_SEPARATORS = re.compile(r"[-_/]+")


def normalize_entity(text: str) -> str:
    return " ".join(_SEPARATORS.sub(" ", text.lower()).split())


def _alternation(forms: list[str], plural: bool) -> str:
    if not forms:
        return r"(?!)"
    body = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    suffix = "(?:e?s)?" if plural else ""
    return rf"(?<![\w])(?:{body}){suffix}(?![\w])"


class Lexicon:
    """Surface forms -> canonical entity names, with the two compiled matchers described above."""

    def __init__(self, entries: list[dict]):
        self.lower: dict[str, str] = {}
        self.cased: dict[str, str] = {}
        for entry in entries:
            for form in entry["surface_forms"]:
                if form == form.lower():
                    self.lower[normalize_entity(form)] = entry["canonical"]
                else:
                    self.cased[form] = entry["canonical"]
        self.names = set(self.lower.values()) | set(self.cased.values())
        self._lower_re = re.compile(_alternation(list(self.lower), plural=True))
        self._cased_re = re.compile(_alternation(list(self.cased), plural=False))

    def canonical(self, entity: str) -> str:
        """The lexicon name of a ground-truth entity, or its normalised text when it is not in the lexicon."""
        return self.cased.get(entity.strip()) or self.lower.get(normalize_entity(entity)) or normalize_entity(entity)

    def find(self, text: str, extra_forms: list[str] = ()) -> set[str]:
        """Canonical names of the lexicon entities in `text`, plus those of `extra_forms` (normalised
        strings) found verbatim."""
        normalised = normalize_entity(text)
        found = {self.lower[self._strip_plural(m.group(0))] for m in self._lower_re.finditer(normalised)}
        found |= {self.cased[m.group(0)] for m in self._cased_re.finditer(text)}
        if extra_forms:
            found |= {m.group(0) for m in re.finditer(_alternation(list(extra_forms), plural=False), normalised)}
        return found

    def _strip_plural(self, word: str) -> str:
        for cut in (0, 1, 2):
            key = word[:len(word) - cut]
            if key in self.lower:
                return key
        raise AssertionError(f"lexicon matcher returned {word!r}, which is no surface form")


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    return Lexicon(json.loads(LEXICON_PATH.read_text())["entities"])


def _head(entity: str) -> str:
    word = entity.split()[-1]
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def _jaccard(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / len(x | y)


def soft_dice(predicted: set[str], truth: set[str]) -> dict[str, float]:
    """R_entity and its parts for two entity sets (see the module docstring)."""
    if not predicted and not truth:
        return {"score": 1.0, "exact": 0.0, "soft": 0.0}
    exact = predicted & truth
    pred_left, truth_left = sorted(predicted - exact), sorted(truth - exact)
    pairs = sorted(((-_jaccard(t, p), t, p) for t in truth_left for p in pred_left
                    if _head(t) == _head(p) or _jaccard(t, p) >= 0.5))
    used_t, used_p = set(), set()
    for _, t, p in pairs:
        if t not in used_t and p not in used_p:
            used_t.add(t)
            used_p.add(p)
    i_soft = len(exact) + 0.5 * len(used_t)
    return {"score": min(1.0, 2.0 * i_soft / (len(predicted) + len(truth))),
            "exact": float(len(exact)), "soft": float(len(used_t))}


_REASONING = re.compile(r"<(observe|think)>(.*?)</\1>", flags=re.DOTALL)


def entity_dice(sample: RewardInput) -> dict[str, float] | None:
    """PathReasoner's R_entity over the `<observe>` and `<think>` bodies against `extra["entities"]`;
    None (not applicable) when the row has no "entities" field."""
    truth_list = sample.extra.get("entities")
    if truth_list is None:
        return None
    if not isinstance(truth_list, list) or not all(isinstance(e, str) for e in truth_list):
        raise ValueError(f"sample {sample.index}: 'entities' must be a list of strings, got {truth_list!r}")
    lex = lexicon()
    truth = {lex.canonical(e) for e in truth_list if e.strip()}
    unknown = sorted(truth - lex.names)
    text = "\n".join(body for _, body in _REASONING.findall(sample.response))
    predicted = lex.find(text, unknown)
    result = soft_dice(predicted, truth)
    return {**result, "predicted": float(len(predicted))}
