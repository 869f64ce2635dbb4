"""Chat turns whose text carries `<image>` placeholders → messages with image content parts, as the
model's chat template takes them; shared by RL prompts (verl's `prompt` chat lists, EasyR1's
`problem`) and SFT conversations (ShareGPT, OpenAI messages, TRL).

Each placeholder, and each image part without an image of its own, takes the next of the row's
images, in order; text pieces between placeholders become text parts (empty ones are dropped), as
verl's RLHFDataset._build_messages (verl/utils/dataset/rl_dataset.py) and EasyR1's
RLHFDataset._build_messages (verl/utils/dataset.py) split them.
"""

from __future__ import annotations

from typing import Any

from engine.errors import DataError

PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "bot": "assistant", "model": "assistant"}


def text_parts(text: Any, where: str, images: list[Any], pending: list[Any]) -> list[dict[str, Any]]:
    """String content with placeholders → parts; each placeholder moves the next of `pending` to `images`."""
    if not isinstance(text, str):
        raise DataError(f"{where}: message content must be text, got {type(text).__name__}")
    parts = []
    for k, piece in enumerate(text.split(PLACEHOLDER)):
        if k:
            if not pending:
                raise DataError(f"{where}: more {PLACEHOLDER} placeholders than images")
            images.append(pending.pop(0))
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_messages(turns: list[tuple[str, Any]], where: str, pending: list[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(role, content) turns → messages with image parts, and the images in order of appearance.
    Content is a string or a list of {"type": "text", "text"} / {"type": "image", "image"?} /
    {"type": "image_url", "image_url": {"url"}} parts; system content becomes a plain string; images
    are only accepted in user turns, and every image of `pending` must be placed."""
    messages, images = [], []
    for i, (role, content) in enumerate(turns):
        at = f"{where}: turn {i}"
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{at}: unknown role {role!r}")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts += text_parts(part.get("text"), at, images, pending)
                elif kind in ("image", "image_url"):
                    ref = part.get("image") if kind == "image" else part.get("image_url")
                    if isinstance(ref, dict):
                        ref = ref.get("url")
                    if ref is None:
                        if not pending:
                            raise DataError(f"{at}: more image parts than images")
                        ref = pending.pop(0)
                    images.append(ref)
                    parts.append({"type": "image"})
                else:
                    raise DataError(f"{at}: content part {part!r:.200} is neither text nor an image")
        else:
            parts = text_parts(content, at, images, pending)
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise DataError(f"{at}: images are only supported in user turns, found one in a {role} turn")
        if role == "system":
            parts = "".join(p["text"] for p in parts)
        messages.append({"role": role, "content": parts})
    if pending:
        raise DataError(f"{where}: {len(images) + len(pending)} images but {len(images)} image placeholders")
    return messages, images
