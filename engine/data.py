"""Dataset rows → validated rows → model-ready prompts.

Row schema (jsonl, one object per line; Patho-R1 style):
    id           str, optional (default "<file>:<line>")
    images       list of image paths, relative to the jsonl's folder or absolute ("image": str also accepted)
    question     str
    options      list of str, optional; shown as "A. …", "B. …" in order
    answer       str: an option letter (or one option's exact text) for multiple choice, else the answer text
    data_source  str, optional
    any other field (entities, …) is kept and handed to the rewards.

A row that breaks the schema, names a missing or undecodable image, or whose prompt is longer than
`data.max_prompt_tokens` is a bad row: with data.bad_rows="skip" it is reported (file, line, problem)
and counted in `data/skipped`; with "fatal" it raises DataError.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from rewards import format_prompt

log = logging.getLogger("pathorl.data")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A bad dataset row: names the file, the line and what is wrong."""


@dataclass
class Prompt:
    """One row made ready for rollout and learning (the image is decoded and processed once and
    shared by all samples of the group)."""

    uid: str
    """Row id; unique within the dataset."""
    row: dict[str, Any]
    """The validated row (image paths made absolute), handed to the rewards."""
    text: str
    """Chat-templated prompt with one <|image_pad|> per image (what vLLM is given)."""
    images: list[Image.Image]
    """Decoded RGB images, in order."""
    prompt_ids: list[int]
    """Prompt token ids with image placeholders expanded, as the HF processor makes them; vLLM's own
    prompt ids must equal these (checked in the trainer)."""
    pixel_values: torch.Tensor | None
    """[num_patches, C·T·P·P] processed pixels of all images, or None without images."""
    image_grid_thw: torch.Tensor | None
    """[num_images, 3] patch grid per image, or None."""
    epoch: int = 0
    """The training-stream epoch that served the row (its rollout seed and ledger entry depend on it)."""


def _validate(row: Any, where: str, base_dir: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = dict(row)
    if "image" in row and "images" not in row:
        row["images"] = [row.pop("image")]
    images = row.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: 'images' must be a list of paths, got {images!r}")
    row["images"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in images]
    for path in row["images"]:
        if not os.path.isfile(path):
            raise DataError(f"{where}: image {path} does not exist")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    options = row.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise DataError(f"{where}: 'options' must be a list of non-empty strings, got {options!r}")
    if len(options) > len(LETTERS):
        raise DataError(f"{where}: {len(options)} options, at most {len(LETTERS)} are supported")
    row["options"] = options
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: 'answer' must be a non-empty string, got {answer!r}")
    if options:
        letter = answer.strip().upper()
        if len(letter) == 1 and letter in LETTERS[: len(options)]:
            row["answer"] = letter
        elif answer.strip() in [o.strip() for o in options]:
            row["answer"] = LETTERS[[o.strip() for o in options].index(answer.strip())]
        else:
            raise DataError(f"{where}: 'answer' {answer!r} is neither a letter A-{LETTERS[len(options) - 1]} "
                            f"nor one of the options")
    row.setdefault("data_source", "")
    return row


def load_rows(path: str, bad_rows: str = "skip") -> tuple[list[dict[str, Any]], list[str]]:
    """Validated rows of a jsonl file and the problems of the rows skipped (bad_rows="skip")."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file does not exist")
    base_dir = os.path.dirname(os.path.abspath(path))
    rows, skipped, seen = [], [], set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from None
                row = _validate(raw, where, base_dir)
                row.setdefault("id", where)
                row["id"] = str(row["id"])
                if row["id"] in seen:
                    raise DataError(f"{where}: duplicate id {row['id']!r}")
                seen.add(row["id"])
                row["_where"] = where
                rows.append(row)
            except DataError as e:
                if bad_rows == "fatal":
                    raise
                log.warning("skipping bad row: %s", e)
                skipped.append(str(e))
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return rows, skipped


class PromptBuilder:
    """Applies the system prompt and the model's chat template, decodes and processes the images."""

    def __init__(self, processor: Any, system_prompt: str, max_prompt_tokens: int):
        self.processor = processor
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens

    def chat_text(self, row: dict[str, Any]) -> str:
        content = [{"type": "image"} for _ in row["images"]]
        content.append({"type": "text", "text": format_prompt(row["question"], row["options"])})
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build(self, row: dict[str, Any]) -> Prompt:
        where = row.get("_where", row["id"])
        images = []
        for path in row["images"]:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except Exception as e:
                raise DataError(f"{where}: image {path} cannot be decoded ({type(e).__name__}: {e})") from None
        text = self.chat_text(row)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if len(ids) > self.max_prompt_tokens:
            raise DataError(f"{where}: prompt is {len(ids)} tokens (images included), longer than "
                            f"data.max_prompt_tokens={self.max_prompt_tokens}")
        return Prompt(uid=row["id"], row=row, text=text, images=images, prompt_ids=ids,
                      pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))


@dataclass
class PromptStream:
    """Endless, epoch-shuffled stream of prompts; bad rows are skipped (and counted) or fatal.

    Pass-rate-aware scheduling: `record_pass_rate` stores each prompt's accuracy over its group; with
    skip_solved_epochs = k > 0, a prompt whose samples were all right or all wrong is skipped for the
    next k epochs (such groups carry no GRPO signal and would be dropped by dynamic sampling)."""

    rows: list[dict[str, Any]]
    builder: PromptBuilder
    bad_rows: str = "skip"
    seed: int = 0
    shuffle: bool = True
    skip_solved_epochs: int = 0
    skipped: list[str] = field(default_factory=list)
    epoch: int = 0
    _order: list[int] = field(default_factory=list)
    _pos: int = 0
    _solved_until: dict[str, int] = field(default_factory=dict)
    _bad: set[str] = field(default_factory=set)
    skipped_solved: int = 0
    passed_over: list[tuple[str, int]] = field(default_factory=list)
    """(row id, epoch) of each row the stream passed over (bad, or skipped as solved) since the
    driver last drained it — the ledger's `skipped` entries."""

    def _next_row(self) -> dict[str, Any]:
        solved = None
        for _ in range(2 * len(self.rows) + 2):
            if self._pos >= len(self._order):
                if self._order:
                    self.epoch += 1
                self._order = list(range(len(self.rows)))
                if self.shuffle:
                    random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)
                self._pos = 0
            row = self.rows[self._order[self._pos]]
            self._pos += 1
            if row["id"] in self._bad:
                self.passed_over.append((row["id"], self.epoch))
                continue
            if self._solved_until.get(row["id"], -1) >= self.epoch:
                self.skipped_solved += 1
                self.passed_over.append((row["id"], self.epoch))
                solved = solved or row
                continue
            return row
        if solved is not None:  # every usable row is skipped as solved: serve them rather than stop
            log.warning("pass-rate scheduling: every usable row is skipped as solved; serving them anyway")
            return solved
        raise DataError("every row is bad; nothing left to train on")

    def take(self, k: int) -> list[Prompt]:
        """The next k prompts."""
        out = []
        while len(out) < k:
            row = self._next_row()
            try:
                prompt = self.builder.build(row)
            except DataError as e:
                if self.bad_rows == "fatal":
                    raise
                log.warning("skipping bad row: %s", e)
                self.skipped.append(str(e))
                self._bad.add(row["id"])
                self.passed_over.append((row["id"], self.epoch))
                continue
            prompt.epoch = self.epoch
            out.append(prompt)
        return out

    def __post_init__(self) -> None:
        self._by_id = {r["id"]: r for r in self.rows}

    def row(self, uid: str) -> dict[str, Any]:
        """The row with id `uid`."""
        return self._by_id[uid]

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: restoring it serves exactly the rows the stream would have served."""
        return {"epoch": self.epoch, "order": list(self._order), "pos": self._pos, "solved_until": dict(self._solved_until),
                "bad": sorted(self._bad), "skipped": list(self.skipped), "skipped_solved": self.skipped_solved,
                "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self.rows):
            raise ValueError(f"the checkpoint's data stream has {state['num_rows']} rows, data.train has "
                             f"{len(self.rows)}: the training data changed")
        self.epoch, self._order, self._pos = state["epoch"], list(state["order"]), state["pos"]
        self._solved_until, self._bad = dict(state["solved_until"]), set(state["bad"])
        self.skipped, self.skipped_solved = list(state["skipped"]), state["skipped_solved"]

    def mark_failed(self, uid: str, problem: str) -> None:
        """A row the engines could not generate for: counted in `data/skipped` with its cause and
        never served again (with data.bad_rows=fatal the run stops)."""
        if self.bad_rows == "fatal":
            raise DataError(problem)
        self.skipped.append(problem)
        self._bad.add(uid)

    def record_pass_rate(self, uid: str, accuracy: list[float]) -> None:
        if self.skip_solved_epochs > 0 and accuracy and len(set(accuracy)) == 1:
            self._solved_until[uid] = self.epoch + self.skip_solved_epochs
