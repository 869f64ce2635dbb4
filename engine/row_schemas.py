"""One training or validation row, in any schema the engine accepts, → the row it serves.

Recognised per row by its keys, so one file may mix them: verl when the row has `reward_model` or a
chat-list `prompt` (TRL when that chat list comes with `solution` or `answer` and no
`reward_model`), EasyR1 when it has `problem` and no `question`, else pathorl.

    pathorl  {"question", "options"?, "images", "answer", "id"?, "data_source"?, …}: README's
             "Dataset schema"; the prompt is built from question and options (engine/data.py).
    verl     {"prompt": [{"role", "content"}], "images"?, "reward_model": {"ground_truth", "style"?},
             "data_source", "extra_info"?, …}: what verl's preprocessing scripts write (e.g.
             examples/data_preprocess/geo3k.py) and verl/utils/dataset/rl_dataset.py reads; every
             `<image>` in a message takes the next of `images`. The chat list is the prompt, as given.
    TRL      {"prompt": [{"role", "content": [{"type": "image"}, {"type": "text", "text"}]}], "images"?
             or "image"?, "solution" (or "answer"), …}: TRL's conversational prompt-only rows for
             GRPOTrainer (its docs' vision datasets), read as verl's with the ground truth taken from
             `solution` (TRL's accuracy_reward reads that column) or `answer`.
    EasyR1   {"problem", "answer", "images"?}: EasyR1's default columns (examples/config.yaml:
             prompt_key problem, answer_key answer, image_key images; read by
             verl/utils/dataset.py); `problem` is the user turn, `<image>` placeholders in place.

The served row keeps every column and sets: `id` (the row's own, else "<file>:<line>" or
"<file>:row <N>"), `images` (resolved references: absolute paths, data URIs or bytes;
engine/images.py), `question` (verl, EasyR1: the user text without placeholders), `options`
([] for verl and EasyR1 rows), `answer` (the ground truth: reward_model.ground_truth for verl,
`answer` for EasyR1; a number becomes its string, 42.0 "42"), `data_source`, and the private `_where`,
`_schema` and, for verl rows, `_chat` (the messages with image parts). Private keys never reach
the rewards.
"""

from __future__ import annotations

import math
from typing import Any

from engine.chat import ROLES, to_messages
from engine.errors import DataError
from engine.images import resolve

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalise(raw: Any, where: str, base_dir: str) -> dict[str, Any]:
    """The served row of `raw` (read at `where`; relative image paths resolve against `base_dir`),
    or DataError naming the row, the column and what is wrong."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("videos"):
        raise DataError(f"{where}: column 'videos': videos are not supported")
    if "reward_model" in raw or isinstance(raw.get("prompt"), list):
        row = _verl(raw, where, base_dir)
    elif "problem" in raw and "question" not in raw:
        row = _easyr1(raw, where, base_dir)
    else:
        row = _pathorl(raw, where, base_dir)
    row["id"] = where if raw.get("id") is None else str(raw["id"])
    row["_where"] = where
    row.setdefault("data_source", "")
    row["data_source"] = str(row["data_source"] or "")
    return row


def _images(raw: dict[str, Any], where: str) -> list[Any]:
    images = raw.get("images")
    if images is None:
        images = [raw["image"]] if raw.get("image") is not None else []
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' must be a list of images (paths, bytes or {{bytes, path}} structs), "
                        f"got {type(images).__name__}")
    return images


def _resolved(refs: list[Any], where: str, base_dir: str) -> list[str | bytes]:
    return [resolve(ref, base_dir, f"{where}: images[{k}]") for k, ref in enumerate(refs)]


def _ground_truth(value: Any, where: str, column: str) -> str:
    """The ground truth as the served row's string `answer`: a number becomes its string (an integral
    float, as a parquet column with nulls stores integers, its integer: 42.0 -> "42"); NaN, an
    infinity, an empty string or anything else is refused. Rewards in verl's style still get
    verl's `reward_model.ground_truth` as stored (rewards/compat.py)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DataError(f"{where}: {column} must be a non-empty string or a finite number, got {value!r}")
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {column} must be a non-empty string or a number, got {value!r:.100}")
    return value


def _pathorl(raw: dict[str, Any], where: str, base_dir: str) -> dict[str, Any]:
    row = dict(raw)
    if "images" not in row:
        row.pop("image", None)
    row["images"] = _resolved(_images(raw, where), where, base_dir)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        hint = "" if "question" in row else " (a verl row has 'prompt' and 'reward_model', an EasyR1 row 'problem')"
        raise DataError(f"{where}: 'question' must be a non-empty string, got {question!r}{hint}")
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
    row["_schema"] = "pathorl"
    return row


def _user_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join("".join(p["text"] for p in m["content"] if p["type"] == "text")
                     for m in messages if m["role"] == "user")


def _verl(raw: dict[str, Any], where: str, base_dir: str) -> dict[str, Any]:
    chat = raw.get("prompt")
    if not isinstance(chat, list) or not chat or not all(isinstance(m, dict) for m in chat):
        raise DataError(f"{where}: column 'prompt' must be a non-empty list of {{role, content}} messages (verl's "
                        f"schema), got {type(chat).__name__}")
    messages, refs = to_messages([(ROLES.get(m.get("role"), m.get("role")), m.get("content")) for m in chat],
                                 f"{where}: column 'prompt'", list(_images(raw, where)))
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: column 'prompt' has no user message")
    reward_model = raw.get("reward_model")
    trl_truth = next((c for c in ("solution", "answer") if c in raw), None) if "reward_model" not in raw else None
    if trl_truth is not None:
        truth, column, schema = raw[trl_truth], f"column {trl_truth!r}", "trl"
    elif isinstance(reward_model, dict) and "ground_truth" in reward_model:
        truth, column, schema = reward_model["ground_truth"], "column 'reward_model': 'ground_truth'", "verl"
    else:
        raise DataError(f"{where}: column 'reward_model' must hold the 'ground_truth' (verl's schema; a TRL row "
                        f"holds it in 'solution' or 'answer'), got {reward_model!r:.100}")
    extra_info = raw.get("extra_info")
    if isinstance(extra_info, list) and all(isinstance(p, tuple) and len(p) == 2 for p in extra_info):
        extra_info = dict(extra_info)  # an Arrow map column reads as (key, value) pairs
    if extra_info is not None and not isinstance(extra_info, dict):
        raise DataError(f"{where}: column 'extra_info' must be an object (handed to the rewards), got "
                        f"{type(extra_info).__name__}")
    row = dict(raw)
    if "extra_info" in raw:
        row["extra_info"] = extra_info
    row.update(images=_resolved(refs, where, base_dir), question=_user_text(messages), options=[],
               answer=_ground_truth(truth, where, column), _schema=schema, _chat=messages)
    return row


def _easyr1(raw: dict[str, Any], where: str, base_dir: str) -> dict[str, Any]:
    problem = raw["problem"]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: column 'problem' must be a non-empty string (EasyR1's schema), got "
                        f"{type(problem).__name__}")
    if "answer" not in raw:
        raise DataError(f"{where}: column 'answer' (the ground truth, EasyR1's schema) is missing")
    messages, refs = to_messages([("user", problem)], f"{where}: column 'problem'", list(_images(raw, where)))
    row = dict(raw)
    row.update(images=_resolved(refs, where, base_dir), question=_user_text(messages), options=[],
               answer=_ground_truth(raw["answer"], where, "column 'answer'"), _schema="easyr1")
    return row


def check_columns(path: str, schema: Any) -> None:
    """A parquet or arrow file's column types, checked once when it is opened: a column of a type no
    row could pass with fails the file at once, naming it (rather than every row, one by one)."""
    import pyarrow as pa

    t = pa.types
    expected = {
        "prompt": ("a list of {role, content} messages (verl)", lambda x: t.is_list(x) or t.is_large_list(x)),
        "reward_model": ("a struct with 'ground_truth' (verl)",
                         lambda x: t.is_struct(x) and x.get_field_index("ground_truth") >= 0),
        "extra_info": ("a struct or map (verl)", lambda x: t.is_struct(x) or t.is_map(x) or t.is_null(x)),
        "problem": ("a string (EasyR1)", lambda x: t.is_string(x) or t.is_large_string(x)),
        "question": ("a string", lambda x: t.is_string(x) or t.is_large_string(x)),
        "images": ("a list of images (paths, bytes or {bytes, path} structs)",
                   lambda x: t.is_list(x) or t.is_large_list(x) or t.is_null(x)),
        "answer": ("a string or a number", lambda x: t.is_string(x) or t.is_large_string(x) or t.is_integer(x)
                   or t.is_floating(x)),
    }
    for name, (what, ok) in expected.items():
        index = schema.get_field_index(name)
        if index >= 0 and not ok(schema.field(index).type):
            raise DataError(f"{path}: column '{name}' has type {schema.field(index).type}, expected {what}")
