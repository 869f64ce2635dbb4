"""Dataset rows → checked rows → model-ready prompts.

Rows come in any schema of engine/row_schemas.py — ours (README's "Dataset schema"), verl's
multimodal parquet rows, EasyR1's `problem`/`answer`/`images` — from any input of
engine/row_sources.py: jsonl, parquet, a Hugging Face `save_to_disk` folder, a folder of shards.

Training rows are read lazily (`LazyRows`): a row is read, checked and turned into a prompt when the
stream serves it, so a dataset of millions of rows starts at once, in the memory of its index (a
byte offset per jsonl line; parquet row groups are read on demand). A data.train of at most
data.check_rows rows is also checked whole before the run starts (engine/preflight.py). Validation
rows are loaded whole (`load_rows`).

A row that breaks its schema, names a missing or undecodable image, or whose prompt is longer than
`data.max_prompt_tokens` is a bad row: with data.bad_rows="skip" it is reported (file, row, problem)
and counted in `data/skipped`; with "fatal" it raises DataError.

Row ids are the row's own `id`, else "<file>:<line>" (jsonl) or "<file>:row <N>" (parquet, arrow),
unique by construction. Duplicate ids are refused where rows are checked whole (`load_rows`, the
start-up check); rows read lazily are not compared, so two rows of a large dataset that give the same
`id` share their bad-row and pass-rate memory and their ledger entries.

The epoch order is regenerated from (trainer.seed, epoch), so the stream's state is a few numbers
and the ids of the rows it remembers (bad ones, solved ones), whatever the dataset's size.
"""

from __future__ import annotations

import logging
import random
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from PIL import Image

from engine.chat import to_messages
from engine.errors import DataError
from engine.images import decode, describe
from engine.row_schemas import check_columns, normalise
from engine.row_sources import RowSource, open_source
from rewards import format_prompt

if TYPE_CHECKING:
    from engine.config import DataConfig

log = logging.getLogger("pathorl.data")


@dataclass
class Prompt:
    """One row made ready for rollout and learning (the image is decoded and processed once and
    shared by all samples of the group)."""

    uid: str
    """Row id; unique within the dataset."""
    row: dict[str, Any]
    """The checked row, handed to the rewards: image paths made absolute; images given as bytes or
    data URIs are shown by their size, never carried (the row is pickled to the reward workers)."""
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
    index: int = -1
    """Position of the row in the training stream's rows (-1 when built outside a stream): how a
    resumed run finds the rows of its carried-over groups."""


class LazyRows:
    """The rows of a dataset, read and checked when asked for; `keep` restricts them to some of the
    source's positions (the rows the start-up check found good), in order."""

    def __init__(self, source: RowSource, keep: Sequence[int] | None = None):
        self.source = source
        self._keep = keep

    def __len__(self) -> int:
        return len(self.source) if self._keep is None else len(self._keep)

    def fetch(self, i: int) -> tuple[str, dict[str, Any] | DataError]:
        """(row id, the checked row or why it is bad) of the i-th row."""
        at = i if self._keep is None else self._keep[i]
        try:
            record = self.source.record(at)
        except DataError as e:
            return self.source.where(at), e
        raw = record.raw
        uid = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else record.where
        try:
            return uid, normalise(raw, record.where, record.base_dir)
        except DataError as e:
            return uid, e

    def subset(self, keep: Sequence[int]) -> LazyRows:
        """These rows restricted to the source positions `keep`."""
        return LazyRows(self.source, array("q", keep))


def open_rows(path: str) -> LazyRows:
    """The rows of a dataset file or folder, read lazily; the column types of parquet and arrow files
    are checked at once (DataError naming the file and column)."""
    source = open_source(path)
    for file, schema in source.schemas():
        check_columns(file, schema)
    return LazyRows(source)


def valid_rows(rows: LazyRows, bad_rows: str, skipped: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, row) of every good row, in order, with duplicate ids refused; the problem of each
    bad row is appended to `skipped` (bad_rows="skip") or raised (bad_rows="fatal")."""
    seen = set()
    for i in range(len(rows)):
        _, row = rows.fetch(i)
        try:
            if isinstance(row, DataError):
                raise row
            if row["id"] in seen:
                raise DataError(f"{row['_where']}: duplicate id {row['id']!r}")
        except DataError as e:
            if bad_rows == "fatal":
                raise
            log.warning("skipping bad row: %s", e)
            skipped.append(str(e))
            continue
        seen.add(row["id"])
        yield i, row


def load_rows(path: str, bad_rows: str = "skip") -> tuple[list[dict[str, Any]], list[str]]:
    """Every good row of a dataset, in memory (validation sets, tools), and the problems of the rows
    skipped (bad_rows="skip")."""
    skipped: list[str] = []
    rows = [row for _, row in valid_rows(open_rows(path), bad_rows, skipped)]
    if not rows:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return rows, skipped


class PromptBuilder:
    """Renders a row's prompt with the model's chat template, decodes and processes its images.

    Ours: the system prompt, then a user turn with the images and `question\nA. …\nB. …`.
    verl: the row's chat list as given; no system prompt is added, as verl adds none (a list without
    a system message gets the chat template's default one), so a verl dataset is prompted exactly as
    in verl. EasyR1: `problem` as the user turn, rendered first through `format_prompt` (the text of
    a Jinja template with `{{ content }}`, EasyR1's data.format_prompt) when one is given, after the
    system prompt. An empty system prompt means no system turn (the chat template's default)."""

    def __init__(self, processor: Any, system_prompt: str, max_prompt_tokens: int, max_images: int = 0,
                 format_prompt: str = ""):
        import jinja2

        self.processor = processor
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.max_images = max_images
        """Most images of a row (0: no limit); the rollout engines reserve room for this many."""
        self.format_prompt = jinja2.Template(format_prompt.strip()) if format_prompt else None

    @classmethod
    def from_config(cls, processor: Any, data: DataConfig) -> PromptBuilder:
        template = ""
        if data.format_prompt:
            with open(data.format_prompt, encoding="utf-8") as f:
                template = f.read()
        return cls(processor, data.system_prompt, data.max_prompt_tokens, data.max_images_per_prompt, template)

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        schema = row.get("_schema")
        if schema in ("verl", "trl"):
            return row["_chat"]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if schema == "easyr1":
            problem = self.format_prompt.render(content=row["problem"]) if self.format_prompt else row["problem"]
            user, _ = to_messages([("user", problem)], f"{row['_where']}: column 'problem'", list(row["images"]))
            return system + user
        content = [{"type": "image"} for _ in row["images"]]
        content.append({"type": "text", "text": format_prompt(row["question"], row["options"])})
        return system + [{"role": "user", "content": content}]

    def chat_text(self, row: dict[str, Any]) -> str:
        return self.processor.apply_chat_template(self.messages(row), add_generation_prompt=True, tokenize=False)

    def build(self, row: dict[str, Any]) -> Prompt:
        where = row.get("_where", row["id"])
        if self.max_images and len(row["images"]) > self.max_images:
            raise DataError(f"{where}: {len(row['images'])} images, more than data.max_images_per_prompt="
                            f"{self.max_images}")
        images = [decode(ref, where, k) for k, ref in enumerate(row["images"])]
        text = self.chat_text(row)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if len(ids) > self.max_prompt_tokens:
            raise DataError(f"{where}: prompt is {len(ids)} tokens (images included), longer than "
                            f"data.max_prompt_tokens={self.max_prompt_tokens}")
        shown = {**row, "images": [describe(ref) for ref in row["images"]]}
        return Prompt(uid=row["id"], row=shown, text=text, images=images, prompt_ids=ids,
                      pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))


@dataclass
class PromptStream:
    """Endless, epoch-shuffled stream of prompts over `rows` (a list of checked rows, or LazyRows
    read as they are served); bad rows are skipped (and counted) or fatal.

    Pass-rate-aware scheduling: `record_pass_rate` stores each prompt's accuracy over its group; with
    skip_solved_epochs = k > 0, a prompt whose samples were all right or all wrong is skipped for the
    next k epochs (such groups carry no GRPO signal and would be dropped by dynamic sampling)."""

    rows: list[dict[str, Any]] | LazyRows
    builder: PromptBuilder
    bad_rows: str = "skip"
    seed: int = 0
    shuffle: bool = True
    skip_solved_epochs: int = 0
    skipped: list[str] = field(default_factory=list)
    epoch: int = 0
    _pos: int = 0
    _order: Sequence[int] = range(0)
    _order_epoch: int = -1
    _solved_until: dict[str, int] = field(default_factory=dict)
    _bad: set[str] = field(default_factory=set)
    skipped_solved: int = 0
    passed_over: list[tuple[str, int]] = field(default_factory=list)
    """(row id, epoch) of each row the stream passed over (bad, or skipped as solved) since the
    driver last drained it — the ledger's `skipped` entries."""

    def _fetch(self, index: int) -> tuple[str, dict[str, Any] | DataError]:
        if isinstance(self.rows, LazyRows):
            return self.rows.fetch(index)
        return self.rows[index]["id"], self.rows[index]

    def _epoch_order(self) -> Sequence[int]:
        """The current epoch's order: Python's shuffle of the positions, seeded by (seed, epoch) as it
        always was, over a compact array (8 bytes a row) rather than a list of ints."""
        if self._order_epoch != self.epoch:
            self._order = range(len(self.rows))
            if self.shuffle:
                self._order = array("q", self._order)
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)
            self._order_epoch = self.epoch
        return self._order

    def _reject(self, uid: str, problem: DataError) -> None:
        if self.bad_rows == "fatal":
            raise problem
        log.warning("skipping bad row: %s", problem)
        self.skipped.append(str(problem))
        self._bad.add(uid)
        self.passed_over.append((uid, self.epoch))

    def _next_row(self) -> tuple[int, dict[str, Any]]:
        solved = None
        for _ in range(2 * len(self.rows) + 2):
            if self._pos >= len(self.rows):
                self.epoch += 1
                self._pos = 0
                self._solved_until = {uid: e for uid, e in self._solved_until.items() if e >= self.epoch}
            index = self._epoch_order()[self._pos]
            self._pos += 1
            uid, row = self._fetch(index)
            if uid in self._bad:
                self.passed_over.append((uid, self.epoch))
                continue
            if isinstance(row, DataError):
                self._reject(uid, row)
                continue
            if self._solved_until.get(uid, -1) >= self.epoch:
                self.skipped_solved += 1
                self.passed_over.append((uid, self.epoch))
                solved = solved or (index, row)
                continue
            return index, row
        if solved is not None:  # every usable row is skipped as solved: serve them rather than stop
            log.warning("pass-rate scheduling: every usable row is skipped as solved; serving them anyway")
            return solved
        raise DataError("every row is bad; nothing left to train on")

    def take(self, k: int) -> list[Prompt]:
        """The next k prompts."""
        out = []
        while len(out) < k:
            index, row = self._next_row()
            try:
                prompt = self.builder.build(row)
            except DataError as e:
                self._reject(row["id"], e)
                continue
            prompt.epoch, prompt.index = self.epoch, index
            out.append(prompt)
        return out

    def row_at(self, index: int) -> dict[str, Any]:
        """The checked row at `index` (a Prompt's `index`); DataError when it is bad."""
        _, row = self._fetch(index)
        if isinstance(row, DataError):
            raise row
        return row

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: restoring it serves exactly the rows the stream would have served
        (the epoch's order is regenerated from the seed)."""
        return {"epoch": self.epoch, "pos": self._pos, "solved_until": dict(self._solved_until),
                "bad": sorted(self._bad), "skipped": list(self.skipped), "skipped_solved": self.skipped_solved,
                "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_rows"] != len(self.rows):
            raise ValueError(f"the checkpoint's data stream has {state['num_rows']} rows, data.train has "
                             f"{len(self.rows)}: the training data changed")
        self.epoch, self._pos = state["epoch"], state["pos"]
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
