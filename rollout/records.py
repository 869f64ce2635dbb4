"""Rollout records in msgpack: the wire format between rollout workers and the driver, and the
run's on-disk log (runs/<name>/rollouts/step_000001.msgpack, a stream of one record per group).

A record is a plain map (version 1):
    uid, worker, latency_s, error          the request and how it went
    prompt_ids                             prompt token ids as the engine ran them
    samples: [{ids, logprobs, finish}]     token ids, sampled log-probs (float32), "stop" | "length"
The driver's log adds: step, row_id, images (paths), and per sample reward and components.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack
from PIL import Image

VERSION = 1


@dataclass
class GroupRequest:
    """One prompt to sample `n` responses for."""

    uid: str
    """Unique id of this request (the driver appends an attempt counter to the row id)."""
    prompt: str
    """Chat-templated prompt text with one <|image_pad|> per image."""
    images: list[Image.Image] = field(default_factory=list)
    """Decoded images; vLLM processes each once for all n samples."""
    n: int = 1
    """Samples in the group."""
    sampling: dict[str, Any] | None = None
    """Overrides of the worker's sampling parameters for this request (e.g. greedy evaluation)."""


@dataclass
class Sample:
    token_ids: list[int]
    """Generated token ids (the stop token included when generation stopped on it)."""
    logprobs: list[float]
    """Log-prob of each generated token under the sampling distribution (temperature applied)."""
    finish_reason: str
    """"stop" (end of sequence) or "length" (hit max_tokens)."""


@dataclass
class GroupResult:
    uid: str
    worker: int
    """Index of the worker that generated it."""
    prompt_token_ids: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    """Why the prompt could not be generated (bad image, prompt too long, …); samples are then empty."""
    latency_s: float = 0.0
    """Seconds from submission to the group's completion."""


def to_record(result: GroupResult) -> dict[str, Any]:
    return {
        "v": VERSION, "uid": result.uid, "worker": result.worker, "latency_s": result.latency_s,
        "error": result.error, "prompt_ids": result.prompt_token_ids,
        "samples": [{"ids": s.token_ids, "logprobs": s.logprobs, "finish": s.finish_reason} for s in result.samples],
    }


def from_record(record: dict[str, Any]) -> GroupResult:
    if record.get("v") != VERSION:
        raise ValueError(f"rollout record {record.get('uid')!r}: unsupported version {record.get('v')!r}")
    return GroupResult(uid=record["uid"], worker=record["worker"], prompt_token_ids=list(record["prompt_ids"]),
                       samples=[Sample(token_ids=list(s["ids"]), logprobs=list(s["logprobs"]), finish_reason=s["finish"])
                                for s in record["samples"]],
                       error=record["error"], latency_s=record["latency_s"])


def pack(records: list[dict[str, Any]]) -> bytes:
    """Records as one msgpack stream (float32 for log-probs and timings: half the bytes, and the
    learner recomputes its own log-probs in fp32 anyway)."""
    packer = msgpack.Packer(use_single_float=True)
    return b"".join(packer.pack(r) for r in records)


def unpack(data: bytes) -> list[dict[str, Any]]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


class RolloutLog:
    """Appends each step's records to <folder>/step_<step>.msgpack."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step_{step:06d}.msgpack")

    def write(self, step: int, records: list[dict[str, Any]]) -> str:
        path = self.path(step)
        with open(path, "ab") as f:
            f.write(pack(records))
        return path


def read(path: str) -> Iterator[dict[str, Any]]:
    """Records of one step file, or of every step file of a folder in step order."""
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, name) for name in os.listdir(path) if name.endswith(".msgpack"))
    for p in paths:
        with open(p, "rb") as f:
            yield from msgpack.Unpacker(f, raw=False, strict_map_key=False)
