"""Sequences → model inputs for the learner's forward passes, with or without a shared prompt.

Unshared (`collate`): one padded row per sequence, prompt included — a group of G responses runs
its prompt, vision tower included, G times.

Shared prefix (`collate_shared`): one row per distinct prompt of the micro-batch, holding the prompt
once followed by all of its responses back to back:

    row:        [ prompt (P) | response 1 (n1) | response 2 (n2) | … | padding ]
    attends to:   causal       prompt + itself   prompt + itself

A block attention mask lets each response see the prompt and its own earlier tokens only, and every
response gets the rotary positions it has in its unshared sequence (Qwen-VL multimodal positions of
the prompt from the model's own `get_rope_index`, then text positions continuing after the prompt
for each response). Each response token therefore sees exactly the keys, values and positions of
its unshared sequence, so log-probs and gradients are those of the unshared pass (up to float
summation order), while the prompt's tokens and images are computed once per row; gradients from
all G responses flow back into the one copy of the prompt.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("pathorl.learner")
IMAGE_TOKEN_TYPE = 1
PROMPT, PAD = 0, -1


def _images(rows_images: list[int], images: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    used = [images[i] for i in rows_images if i >= 0]
    if not used:
        return {}
    return {"pixel_values": torch.cat([p for p, _ in used]), "image_grid_thw": torch.cat([g for _, g in used])}


def collate(seqs: list[Any], images: list[tuple[torch.Tensor, torch.Tensor]], image_token_id: int,
            vision_token_ids: list[int]) -> dict[str, Any]:
    """One padded row per sequence (`engine.learner.Sequence`: prompt_ids, response_ids, image,
    vision_in_response). Returns model inputs plus `ids` (real token ids, embedded), `select` (row,
    column) [N] of the hidden states that predict the N response tokens, and `targets` [N]."""
    full = [s.prompt_ids + s.response_ids for s in seqs]
    length = max(len(x) for x in full)
    ids = torch.zeros(len(full), length, dtype=torch.long)
    mask = torch.zeros(len(full), length, dtype=torch.long)
    in_prompt = torch.zeros(len(full), length, dtype=torch.bool)
    for i, (s, x) in enumerate(zip(seqs, full)):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        in_prompt[i, : len(s.prompt_ids)] = True
    # A policy can sample a vision placeholder token (<|image_pad|>, …) in its response. vLLM
    # embeds such a token as text: image features fill only the prompt's placeholders. Here the
    # model sees the real ids through their embeddings, while the ids it locates image features
    # and rotary positions by have response placeholders blanked (else: "image features and
    # image tokens do not match", or features and positions shifted).
    real = in_prompt | torch.tensor([s.vision_in_response for s in seqs])[:, None]
    stray = torch.isin(ids, torch.tensor(vision_token_ids)) & ~real
    batch = {"ids": ids, "input_ids": ids.masked_fill(stray, 0), "attention_mask": mask,
             "mm_token_type_ids": ((ids == image_token_id) & real).int() * IMAGE_TOKEN_TYPE,
             **_images([s.image for s in seqs], images)}
    # Hidden state at position p predicts token p + 1: the response's tokens are predicted from
    # positions len(prompt) − 1 … len(prompt) + len(response) − 2.
    rows = torch.cat([torch.full((len(s.response_ids),), i) for i, s in enumerate(seqs)])
    cols = torch.cat([torch.arange(len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.response_ids) - 1) for s in seqs])
    batch["select"] = (rows, cols)
    batch["targets"] = torch.tensor([t for s in seqs for t in s.response_ids], dtype=torch.long)
    return batch


def shared_prefix_supported(model: torch.nn.Module, wanted: bool, warn: bool = True) -> bool:
    """Whether `model`'s passes can share prompts: `collate_shared` places responses with the rotary
    positions of the model's own `get_rope_index`. A model class without it runs unshared (with a
    warning when `warn`)."""
    supported = hasattr(getattr(model, "model", None), "get_rope_index")
    if wanted and not supported and warn:
        log.warning("learner.shared_prefix: %s has no model.get_rope_index; each sequence carries its own "
                    "prompt (unshared passes)", type(model).__name__)
    return wanted and supported


def prefix_key(seq: Any) -> tuple:
    """Sequences with equal keys share their prompt (same image entry, same prompt token ids)."""
    return (seq.image, tuple(seq.prompt_ids))


def collate_shared(seqs: list[Any], images: list[tuple[torch.Tensor, torch.Tensor]], image_token_id: int,
                   vision_token_ids: list[int], rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]]
                   ) -> dict[str, Any]:
    """One row per distinct prompt of `seqs`, the prompt once and its responses after it (module
    docstring). `rope_index` is the model's `get_rope_index(input_ids [1, L], mm_token_type_ids
    [1, L], image_grid_thw)` → (positions [3, 1, L], deltas). Sequences whose response holds real
    images (`vision_in_response`) need `collate`. Same outputs as `collate`, plus `position_ids`
    [3, rows, L] and a boolean `attention_mask` [rows, 1, L, L] (True: may attend)."""
    members: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        members.setdefault(prefix_key(s), []).append(i)
    groups = list(members.values())
    lengths = [len(seqs[g[0]].prompt_ids) + sum(len(seqs[i].response_ids) for i in g) for g in groups]
    n_rows, length = len(groups), max(lengths)
    ids = torch.zeros(n_rows, length, dtype=torch.long)
    segment = torch.full((n_rows, length), PAD, dtype=torch.long)
    positions = torch.zeros(3, n_rows, length, dtype=torch.long)
    select: list[tuple[int, list[int]]] = [(0, [])] * len(seqs)
    for r, group in enumerate(groups):
        first = seqs[group[0]]
        prompt, n_prompt = torch.tensor(first.prompt_ids), len(first.prompt_ids)
        ids[r, :n_prompt] = prompt
        segment[r, :n_prompt] = PROMPT
        # Positions of the prompt followed by the longest response as text: every response's
        # positions are a prefix of that tail, as in its own unshared sequence.
        longest = max(len(seqs[i].response_ids) for i in group)
        unshared = torch.cat([prompt, torch.zeros(longest, dtype=torch.long)])[None]
        grid = images[first.image][1] if first.image >= 0 else None
        pos, _ = rope_index(input_ids=unshared, image_grid_thw=grid,
                            mm_token_type_ids=(unshared == image_token_id).int() * IMAGE_TOKEN_TYPE)
        positions[:, r, :n_prompt] = pos[:, 0, :n_prompt]
        start = n_prompt
        for k, i in enumerate(group, 1):
            response = seqs[i].response_ids
            n = len(response)
            ids[r, start:start + n] = torch.tensor(response, dtype=torch.long)
            segment[r, start:start + n] = k
            positions[:, r, start:start + n] = pos[:, 0, n_prompt:n_prompt + n]
            # The first response token is predicted from the prompt's last position, the others
            # from the response's own previous token.
            select[i] = (r, ([n_prompt - 1] + list(range(start, start + n - 1))) if n else [])
            start += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    mask = causal & (key != PAD) & ((key == PROMPT) | (key == query))
    stray = torch.isin(ids, torch.tensor(vision_token_ids)) & (segment != PROMPT)
    batch = {"ids": ids, "input_ids": ids.masked_fill(stray, 0), "attention_mask": mask[:, None],
             "position_ids": positions,
             "mm_token_type_ids": ((ids == image_token_id) & (segment == PROMPT)).int() * IMAGE_TOKEN_TYPE,
             **_images([seqs[g[0]].image for g in groups], images)}
    batch["select"] = (torch.tensor([r for r, cols in select for _ in cols], dtype=torch.long),
                       torch.tensor([c for _, cols in select for c in cols], dtype=torch.long))
    batch["targets"] = torch.tensor([t for s in seqs for t in s.response_ids], dtype=torch.long)
    return batch


def selected_hidden(model: torch.nn.Module, batch: dict[str, Any], device: torch.device | str) -> torch.Tensor:
    """Final hidden states [N, hidden] of a Qwen-VL `model` at the positions that predict the
    response tokens of `batch` (from `collate` or `collate_shared`)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("select", "targets", "ids")}
    mask = inputs["attention_mask"]
    if mask.dim() == 4:  # a custom mask is used as given: additive, in the activations' dtype
        dtype = model.model.get_input_embeddings().weight.dtype
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    # The model locates image features by `input_ids`, in which sampled placeholders are blanked
    # (`collate`); the decoder must still embed those tokens as what they are, as vLLM does. Qwen3-VL
    # takes ids or embeddings, not both, so the real embeddings go in at the decoder's input.
    stray = (batch["ids"] != batch["input_ids"]).to(device)
    hook = None
    if stray.any():
        real = model.model.get_input_embeddings()(batch["ids"].to(device))

        def embed_real(module, args, kwargs):
            kwargs["inputs_embeds"] = torch.where(stray[..., None], real, kwargs["inputs_embeds"])
            return args, kwargs

        hook = model.model.language_model.register_forward_pre_hook(embed_real, with_kwargs=True)
    try:
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    rows, cols = batch["select"]
    return hidden[rows.to(device), cols.to(device)].contiguous()
