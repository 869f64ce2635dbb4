"""Supervised examples (chain-of-thought SFT, continued pre-training) from the formats users bring.

Row formats, recognised per row by their keys (jsonl, or parquet with images as paths or bytes):

    ours       {"question", "options"?, "images", "response"}: the RL prompt (system prompt, options
               as "A. …") with `response` as the assistant turn — SFT on it trains exactly what RL samples.
    ShareGPT   {"conversations": [{"from": "system"|"human"|"gpt", "value": "… <image> …"}], "images",
               "system"?}: LLaVA's and LLaMA-Factory's format (Patho-R1's SFT data); one `<image>` per
               image, in order; LLaMA-Factory's `system` column becomes the system turn.
    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}], "images"?,
               "system"?}: OpenAI-style; parts are {"type": "text", "text"}, {"type": "image", "image"?}
               or {"type": "image_url", "image_url": {"url"}}; an image part without its own image
               takes the next of `images`, and `<image>` in string content does the same
               (LLaMA-Factory); messages naming no image at all get the row's images before the first
               user text (TRL's prepare_multimodal_messages); a `system` column as for ShareGPT.
    TRL        {"prompt", "completion"} (TRL's prompt-completion type): both message lists
               (conversational; the completion's assistant turns are the targets, any in the prompt
               context only, as TRL's completion_only_loss) or both strings
               (standard; the prompt is the user turn), with `images` as for `messages`.
    caption    {"image"|"images", "caption"}: continued pre-training; the user turn is the image(s)
               and `sft.caption_instruction`, the caption is the target.

An image is a path (relative to the data file's folder, or absolute; `file://` accepted), a
`data:image/…;base64,` URI, raw bytes, or a {"bytes", "path"} struct (Hugging Face `datasets`' Image
feature in parquet); see engine/images.py. Remote URLs are refused: nothing is downloaded.

Loss mask. The conversation is rendered once by the model's chat template; every assistant turn
(its text and the end-of-turn token, not the newline after it) is a target, everything else has
weight 0. `sft.segment_weights` (e.g. {observe: 0, think: 1, answer: 1}) weighs each tagged span
`<tag>…</tag>` of a target, tags included; text outside tagged spans keeps weight 1. A token takes the
largest weight of the characters it covers (BPE can merge across a boundary, e.g. "><" in
"</think><answer>"). PathReasoner-R1's "trajectory masking" is described but its exact rule is not
published: this is the general form it is an instance of.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from engine.chat import ROLES, to_messages
from engine.errors import DataError
from engine.images import load_image
from rewards import format_prompt

_TAG = re.compile(r"<(/?)([A-Za-z_][\w-]*)>")


@dataclass
class Conversation:
    """A row normalised: chat messages whose content is a list of text and image parts, and the
    image references in the order their parts appear."""

    uid: str
    where: str
    messages: list[dict[str, Any]]
    images: list[Any]
    data_source: str = ""
    first_target: int = 0
    """Assistant turns from this message on are targets; earlier ones are context (the `prompt` of
    a TRL prompt-completion row: TRL's completion_only_loss masks the whole prompt)."""


@dataclass
class Example:
    """A conversation tokenised: what the learner trains on."""

    uid: str
    input_ids: list[int]
    weights: list[float]
    """Loss weight per token of `input_ids` (0 outside the targets)."""
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    data_source: str = ""


def read_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, raw row) of a jsonl or parquet file; `where` is "file:line" or "file:row N"."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: dataset file does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{path}:row {index}", row
                index += 1
        return
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: not valid JSON ({e})")


def _row_images(row: dict[str, Any], where: str) -> list[Any]:
    images = row.get("images", [row["image"]] if row.get("image") is not None else [])
    if images is None:
        images = []
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' must be a list, got {type(images).__name__}")
    return list(images)


def _chat(turns: list[tuple[str, Any]], where: str, pending: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(role, content) turns → messages with image parts and the images in order (engine/chat.py),
    with at least one assistant turn to train on."""
    messages, images = to_messages(turns, where, pending)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and not "".join(p.get("text") or "" for p in m["content"]).strip():
            raise DataError(f"{where}: turn {k}: the assistant turn is empty (it would teach the model to stop "
                            "at once)")
    return messages, images


def _images_first(turns: list[tuple[str, Any]], n_images: int) -> list[tuple[str, Any]]:
    """TRL's `prepare_multimodal_messages` for rows whose messages name no image at all (no
    `<image>`, no image part) while the row has images: the images go before the first user turn's
    text. Other rows are returned as they are."""
    def names_an_image(content):
        if isinstance(content, str):
            return "<image>" in content
        return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                                 for p in content)

    users = [k for k, (role, content) in enumerate(turns) if role == "user"]
    if not n_images or not users or any(names_an_image(c) for _, c in turns) \
            or not isinstance(turns[users[0]][1], (str, list)):
        return turns
    k, content = users[0], turns[users[0]][1]
    text = [{"type": "text", "text": content}] if isinstance(content, str) else content
    return turns[:k] + [("user", [{"type": "image"}] * n_images + text)] + turns[k + 1:]


def normalise(row: Any, where: str, system_prompt: str, caption_instruction: str) -> Conversation:
    """Any supported row format → a Conversation (DataError naming the row and problem otherwise)."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    pending = _row_images(row, where)
    first_target = 0
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        pairs = []
        for i, t in enumerate(turns):
            speaker = t.get("from", t.get("role"))
            if speaker not in ROLES:
                raise DataError(f"{where}: turn {i}: unknown speaker {speaker!r} (expected human, gpt or system)")
            pairs.append((ROLES[speaker], t.get("value", t.get("content"))))
        if isinstance(row.get("system"), str) and row["system"] and not (pairs and pairs[0][0] == "system"):
            pairs.insert(0, ("system", row["system"]))  # LLaMA-Factory's optional `system` column
        messages, images = _chat(pairs, where, pending)
    elif "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        pairs = [(ROLES.get(t.get("role"), t.get("role")), t.get("content")) for t in turns]
        if isinstance(row.get("system"), str) and row["system"] and not (pairs and pairs[0][0] == "system"):
            pairs.insert(0, ("system", row["system"]))
        messages, images = _chat(_images_first(pairs, len(pending)), where, pending)
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            turns = [("user", prompt), ("assistant", completion)]
        elif isinstance(prompt, list) and isinstance(completion, list) and all(
                isinstance(t, dict) for t in prompt + completion):
            turns = [(ROLES.get(t.get("role"), t.get("role")), t.get("content")) for t in prompt + completion]
            if not completion or any(t.get("role") != "assistant" for t in completion):
                raise DataError(f"{where}: 'completion' must be one or more assistant turns")
            first_target = len(prompt)
        else:
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both be message lists")
        messages, images = _chat(turns, where, pending)
    elif "caption" in row:
        if not isinstance(row["caption"], str) or not row["caption"].strip():
            raise DataError(f"{where}: 'caption' must be a non-empty string")
        if not pending:
            raise DataError(f"{where}: a caption row needs an image")
        user = [{"type": "image"} for _ in pending] + [{"type": "text", "text": caption_instruction}]
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": row["caption"]}]}]
        images = pending
    elif "response" in row:
        question, options, response = row.get("question"), row.get("options") or [], row["response"]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise DataError(f"{where}: 'options' must be a list of strings")
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{where}: 'response' must be a non-empty string")
        user = [{"type": "image"} for _ in pending] + [{"type": "text", "text": format_prompt(question, options)}]
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []  # as RL's prompts
        messages = system + [{"role": "user", "content": user},
                             {"role": "assistant", "content": [{"type": "text", "text": response}]}]
        images = pending
    else:
        raise DataError(f"{where}: no known format: expected 'conversations' (ShareGPT), 'messages' (OpenAI), "
                        f"'prompt' + 'completion' (TRL), 'caption' (image-caption pairs) or 'response' (our "
                        f"schema); keys are {sorted(row)}")
    return Conversation(uid=where if row.get("id") is None else str(row["id"]), where=where, messages=messages, images=images,
                        data_source=str(row.get("data_source") or ""), first_target=first_target)


def _char_weights(text: str, start: int, end: int, segment_weights: dict[str, float], where: str) -> list[float]:
    """Weights of the characters text[start:end] of one assistant target (tags included in their span)."""
    weights = [1.0] * (end - start)
    if not segment_weights:
        return weights
    body = text[start:end]
    open_tag, open_at = None, 0
    for m in _TAG.finditer(body):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in segment_weights:
            raise DataError(f"{where}: target has tag <{m.group(1)}{name}>, which sft.segment_weights does not name "
                            f"(it names {sorted(segment_weights)})")
        if not closing:
            if open_tag is not None:
                raise DataError(f"{where}: <{name}> opens inside <{open_tag}> (segments cannot nest)")
            open_tag, open_at = name, m.start()
        else:
            if open_tag != name:
                raise DataError(f"{where}: </{name}> closes {'nothing' if open_tag is None else f'<{open_tag}>'}")
            weights[open_at:m.end()] = [float(segment_weights[name])] * (m.end() - open_at)
            open_tag = None
    if open_tag is not None:
        raise DataError(f"{where}: <{open_tag}> is never closed")
    return weights


class ExampleBuilder:
    """Renders conversations with the model's chat template and tokenises them with their loss weights."""

    def __init__(self, processor: Any, base_dir: str, segment_weights: dict[str, float], max_length: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.base_dir = base_dir
        self.segment_weights = dict(segment_weights)
        self.max_length = max_length
        self.image_token = processor.image_token
        self.merge = processor.image_processor.merge_size

    def _render(self, messages: list[dict[str, Any]], **kw) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kw)

    def text_and_weights(self, conv: Conversation) -> tuple[str, list[float]]:
        """The rendered conversation and one loss weight per character."""
        text = self._render(conv.messages)
        weights = [0.0] * len(text)
        for i, m in enumerate(conv.messages):
            if m["role"] != "assistant" or i < conv.first_target:
                continue
            before = self._render(conv.messages[:i], add_generation_prompt=True)
            upto = self._render(conv.messages[: i + 1])
            content = "".join(p["text"] for p in m["content"])
            if not (upto.startswith(before) and text.startswith(upto) and upto[len(before):].startswith(content)):
                raise DataError(f"{conv.where}: the chat template does not render turns as prefixes of the "
                                "conversation; assistant targets cannot be located")
            end = len(upto.rstrip("\n"))
            weights[len(before):end] = _char_weights(text, len(before), end, self.segment_weights, conv.where)
        return text, weights

    def build(self, conv: Conversation) -> Example:
        text, char_w = self.text_and_weights(conv)
        images = [load_image(ref, self.base_dir, conv.where) for ref in conv.images]
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if len(ids) > self.max_length:
            raise DataError(f"{conv.where}: example is {len(ids)} tokens (images included), longer than "
                            f"sft.max_length={self.max_length}")
        # The processor expands each image placeholder to the image's patch count; the same expansion
        # of the text, tokenised with offsets, maps character weights to tokens.
        grid = enc.get("image_grid_thw")
        counts = [] if grid is None else [int(g.prod()) // self.merge ** 2 for g in grid]
        pieces = text.split(self.image_token)
        expanded, weights, pos = [], [], 0
        for k, piece in enumerate(pieces):
            expanded.append(piece)
            weights += char_w[pos:pos + len(piece)]
            pos += len(piece)
            if k < len(counts):
                expanded.append(self.image_token * counts[k])
                weights += [0.0] * (len(self.image_token) * counts[k])
                pos += len(self.image_token)
        tok = self.tokenizer("".join(expanded), return_offsets_mapping=True, add_special_tokens=False)
        if tok["input_ids"] != ids:
            raise DataError(f"{conv.where}: tokenising the expanded text disagrees with the processor's ids")
        token_w = [max(weights[s:e], default=0.0) for s, e in tok["offset_mapping"]]
        if not any(w > 0 for w in token_w):
            raise DataError(f"{conv.where}: every target token has loss weight 0 (nothing to train on)")
        return Example(uid=conv.uid, input_ids=ids, weights=token_w, pixel_values=enc.get("pixel_values"),
                       image_grid_thw=grid, data_source=conv.data_source)
