"""Image references of dataset rows → RGB images, for RL prompts (engine/data.py) and SFT examples
(engine/sft_data.py).

A reference is a path (relative to the data file's folder, or absolute; `file://` accepted), a
`data:image/…;base64,` URI, raw bytes, or a struct {"bytes", "path"}: Hugging Face `datasets`' Image
feature as parquet and arrow files store it (datasets/features/image.py), the bytes winning when
both are set, as there; verl's {"image": path} is read as a path too. Remote URLs are refused:
nothing is downloaded.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from PIL import Image

from engine.errors import DataError


def resolve(ref: Any, base_dir: str, where: str) -> str | bytes:
    """A row's image reference → an absolute path, a data URI or the image's bytes, checked as far
    as that is cheap (a path must name a file); decoding is left to `decode`."""
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path") or ref.get("image")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: an image must be a path, a data URI, bytes or a {{bytes, path}} struct, "
                        f"got {type(ref).__name__}")
    if ref.startswith("data:"):
        return ref
    if ref.startswith(("http://", "https://")):
        raise DataError(f"{where}: image {ref} cannot be read: remote images are not downloaded; give a local "
                        "path, bytes or a data URI")
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    path = path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))
    if not os.path.isfile(path):
        raise DataError(f"{where}: image {path} does not exist")
    return path


def describe(ref: str | bytes) -> str:
    """A resolved reference as a message or a record shows it: the path, or the size of the data."""
    if isinstance(ref, str) and not ref.startswith("data:"):
        return ref
    return f"<{'data URI' if isinstance(ref, str) else 'bytes'}, {len(ref)} bytes>"


def decode(ref: str | bytes, where: str, item: int | None = None) -> Image.Image:
    """A resolved reference (see `resolve`) → an RGB image; `item`: its position in the row's
    `images`, named in the error."""
    try:
        if isinstance(ref, bytes):
            source: Any = io.BytesIO(ref)
        elif ref.startswith("data:"):
            source = io.BytesIO(base64.b64decode(ref.split(",", 1)[1]))
        else:
            source = ref
        with Image.open(source) as im:
            return im.convert("RGB")
    except Exception as e:
        column = "" if item is None else f"column 'images', item {item}: "
        raise DataError(f"{where}: image {describe(ref)} cannot be decoded ({column}{type(e).__name__}: {e})") from None


def load_image(ref: Any, base_dir: str, where: str) -> Image.Image:
    """Any accepted reference → an RGB image."""
    return decode(resolve(ref, base_dir, where), where)
