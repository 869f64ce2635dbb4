"""The data-parallel learner ranks seen from the driver: start them, split work across them, gather.

A step's sequences are split across ranks balanced by token count; every rank runs the same number
of micro-batches (gradient reductions must pair up), and each shard carries the step's global
sequence and token counts so the loss normalisation is the same however the step is split.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Hashable

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.collate import prefix_key
from engine.config import Config
from engine.learner import Learner, Sequence, Shard
from rollout.placement import reserve

log = logging.getLogger("pathorl.learner")


def split_across_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Indices of sequences per rank: each rank gets the same number of sequences (±1), assigned
    longest-first to the rank with the fewest tokens among those with room (balanced compute). With
    fewer sequences than ranks the last ranks get none (fine for log-prob passes; an update needs
    one per rank, see `split_mini_batches`)."""
    capacity = [len(lengths) // world_size + (1 if r < len(lengths) % world_size else 0) for r in range(world_size)]
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min((r for r in range(world_size) if len(ranks[r]) < capacity[r]), key=lambda r: tokens[r])
        ranks[r].append(i)
        tokens[r] += lengths[i]
    return [sorted(r) for r in ranks]


def pack_by_tokens(rows: list[tuple[Hashable, int, int]], max_tokens: int) -> list[int]:
    """Sizes of consecutive micro-batches of sequences given as (prefix key, prompt length, response
    length), such that each padded micro-batch — its packed rows × its longest row — stays within
    `max_tokens`. Consecutive sequences with one key share a row and count their prompt once (the
    shared-prefix pass, `engine.collate`); give every sequence its own key for one row each. A
    sequence longer than the budget gets a micro-batch of its own (trained, with a warning)."""
    sizes: list[int] = []
    row_lengths: list[int] = []
    last = None
    for key, prompt, response in rows:
        trial = row_lengths[:-1] + [row_lengths[-1] + response] if sizes and key == last else row_lengths + [prompt + response]
        if sizes and len(trial) * max(trial) <= max_tokens:
            sizes[-1] += 1
            row_lengths = trial
        else:
            if prompt + response > max_tokens:
                log.warning("a sequence of %d tokens (prompt %d + response %d) exceeds "
                            "max_tokens_per_micro_batch=%d: it is trained in a micro-batch of its own",
                            prompt + response, prompt, response, max_tokens)
            sizes.append(1)
            row_lengths = [prompt + response]
        last = key
    return sizes


def _contiguous(order: list[int], world_size: int) -> list[list[int]]:
    """`order` cut into `world_size` consecutive parts of equal size (±1), the larger ones first."""
    counts = [len(order) // world_size + (1 if r < len(order) % world_size else 0) for r in range(world_size)]
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [order[end - n:end] for n, end in zip(counts, ends)]


def make_shards(sequences: list[Sequence], images: list[Any], world_size: int, micro_batch_size: int,
                max_tokens: int = 0, shared_prefix: bool = False) -> list[Shard]:
    """One optimizer step's sequences as a shard per rank (images re-indexed per shard), cut into
    micro-batches of `micro_batch_size` sequences, or by padded token count when `max_tokens` > 0.
    Unshared: ranks balanced by tokens, each rank's sequences sorted by length so that similar
    lengths share a micro-batch. Shared prefix: the sequences ordered by prompt (prompts by packed
    length) and cut into consecutive parts, so a prompt's responses stay together (a group is split only at a rank or
    micro-batch boundary, each part computing the prompt once). Every rank gets the same number of
    micro-batches (padded with empty ones)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in sequences]
    if shared_prefix:
        first: dict[tuple, int] = {}
        keys = [first.setdefault(prefix_key(s), len(first)) for s in sequences]
        packed = [0] * len(first)
        for s, k in zip(sequences, keys):
            packed[k] += len(s.response_ids) + (0 if packed[k] else len(s.prompt_ids))
        split = _contiguous(sorted(range(len(sequences)), key=lambda i: (packed[keys[i]], keys[i])), world_size)
    else:
        keys = list(range(len(sequences)))
        split = split_across_ranks(lengths, world_size)
        if max_tokens > 0:
            split = [sorted(idx, key=lambda i: lengths[i]) for idx in split]
    if max_tokens > 0:
        sizes = [pack_by_tokens([(keys[i], len(sequences[i].prompt_ids), len(sequences[i].response_ids)) for i in idx],
                                max_tokens) for idx in split]
    else:
        sizes = [[min(micro_batch_size, len(idx) - k) for k in range(0, len(idx), micro_batch_size)] for idx in split]
    num_micro = max(1, max(len(s) for s in sizes))
    num_tokens = float(sum(sum(s.loss_weights) if s.loss_weights is not None else len(s.response_ids)
                           for s in sequences))
    shards = []
    for idx, micro in zip(split, sizes):
        used = sorted({sequences[i].image for i in idx if sequences[i].image >= 0})
        remap = {old: new for new, old in enumerate(used)}
        seqs = [Sequence(**{**vars(sequences[i]), "image": remap.get(sequences[i].image, -1)}) for i in idx]
        shards.append(Shard(sequences=seqs, images=[images[i] for i in used], index=list(idx),
                            micro_sizes=micro + [0] * (num_micro - len(micro)),
                            num_seqs=len(sequences), num_tokens=num_tokens))
    return shards


def pass_tokens(shards: list[Shard], shared_prefix: bool) -> tuple[int, int]:
    """(tokens, padded tokens) one forward pass over `shards` feeds the model: rows of packed prompt +
    responses with the shared prefix (as engine/collate.py builds them), else one row per sequence."""
    tokens = padded = 0
    for shard in shards:
        start = 0
        for size in shard.micro_sizes:
            mb = shard.sequences[start:start + size]
            start += size
            rows: dict[Any, int] = {}
            for k, s in enumerate(mb):
                key = prefix_key(s) if shared_prefix and not any(q.vision_in_response for q in mb) else k
                rows[key] = rows.get(key, len(s.prompt_ids)) + len(s.response_ids)
            tokens += sum(rows.values())
            padded += len(rows) * max(rows.values(), default=0)
    return tokens, padded


def unique_tokens(sequences: list[Sequence]) -> int:
    """Tokens of the step counting each distinct prompt once: what an ideal shared pass computes."""
    prompts = {prefix_key(s): len(s.prompt_ids) for s in sequences}
    return sum(prompts.values()) + sum(len(s.response_ids) for s in sequences)


def split_mini_batches(group_ids: list[int], k: int, min_size: int) -> list[list[int]]:
    """Indices of the step's sequences per PPO mini-batch: whole prompt groups (`group_ids` [B]) dealt
    round-robin into `k` mini-batches. Empty ones are dropped and one with fewer than `min_size`
    sequences (the learner ranks: each must get one) is merged into its neighbour, so a thin step —
    dynamic sampling at its cap, bad rows — trains on the mini-batches that exist. Returns [] when
    the whole step has fewer than `min_size` sequences."""
    groups = sorted(set(group_ids))
    parts = [set(groups[j::k]) for j in range(k)]
    dealt = [[i for i, g in enumerate(group_ids) if g in part] for part in parts]
    merged: list[list[int]] = []
    pending: list[int] = []
    for mb in dealt:
        pending += mb
        if len(pending) >= min_size:
            merged.append(sorted(pending))
            pending = []
    if pending and merged:
        merged[-1] = sorted(merged[-1] + pending)
    return merged


class LearnerGroup:
    def __init__(self, cfg: Config, use_reference: bool | None = None):
        """`use_reference`: load the frozen KL reference on every rank (None: cfg.uses_reference)."""
        lc = cfg.learner
        self.world_size = lc.num_ranks
        self.micro_batch_size = lc.micro_batch_size
        self.max_tokens = lc.max_tokens_per_micro_batch
        self.shared_prefix = lc.shared_prefix  # until the ranks report whether their model supports it
        self.lr = lc.lr
        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {}), **lc.resources}
        self._pg = reserve([bundle] * lc.num_ranks, "learner ranks", cfg.trainer.placement_timeout_s)
        actor = ray.remote(Learner)
        self.ranks = [
            actor.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus,
                          runtime_env={"env_vars": {"OMP_NUM_THREADS": str(lc.torch_threads)}},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r))
            .remote(model=dataclasses.asdict(cfg.model), learner=vars(lc), algorithm=vars(cfg.algorithm),
                    temperature=cfg.rollout.temperature, max_response_len=cfg.rollout.max_new_tokens,
                    use_reference=cfg.uses_reference if use_reference is None else use_reference,
                    seed=cfg.trainer.seed)
            for r in range(lc.num_ranks)
        ]
        master, port = ray.get(self.ranks[0].endpoint.remote())
        self._starting = [a.init.remote(r, self.world_size, master, port) for r, a in enumerate(self.ranks)]

    def wait_ready(self) -> None:
        self.shared_prefix = all(ray.get(self._starting))

    def _shards(self, sequences: list[Sequence], images: list[Any], max_tokens: int | None = None) -> list[Shard]:
        return make_shards(sequences, images, self.world_size, self.micro_batch_size,
                           self.max_tokens if max_tokens is None else max_tokens, self.shared_prefix)

    def compute_logprobs(self, sequences: list[Sequence], images: list[Any], which: str,
                         temperature: float | None = None) -> list[list[float]]:
        """Per-sequence response log-probs under the current policy ("old") or the reference ("ref"),
        at `temperature` (None: the rollout temperature)."""
        n = len(sequences)
        # Every rank gets a sequence (repeats of the first, results dropped): under ZeRO-3 each
        # forward is a collective that all ranks join.
        sequences = sequences + sequences[:1] * max(0, self.world_size - n)
        shards = self._shards(sequences, images)
        parts = ray.get([a.compute_logprobs.remote(s, which, temperature) for a, s in zip(self.ranks, shards)])
        out: list[list[float]] = [[] for _ in sequences]
        for shard, part in zip(shards, parts):
            for i, lp in zip(shard.index, part):
                out[i] = lp
        return out[:n]

    def update(self, mini_batches: list[list[Sequence]], images: list[Any], lr: float | None = None) -> dict[str, float]:
        """One RL step over the given PPO mini-batches at learning rate `lr` (None: learner.lr);
        returns statistics summed over ranks."""
        thin = [len(mb) for mb in mini_batches if len(mb) < self.world_size]
        if thin or not mini_batches:
            raise ValueError(f"every PPO mini-batch needs at least one sequence per learner rank "
                             f"({self.world_size}); got mini-batches of {[len(mb) for mb in mini_batches]}")
        per_rank = [[] for _ in self.ranks]
        for mb in mini_batches:
            for r, shard in enumerate(self._shards(mb, images)):
                per_rank[r].append(shard)
        lr = self.lr if lr is None else lr
        stats = _sum(ray.get([a.update.remote(s, lr) for a, s in zip(self.ranks, per_rank)]))
        tokens, padded = pass_tokens([s for shards in per_rank for s in shards], self.shared_prefix)
        stats.update({"learner/pass_tokens": float(tokens), "learner/pass_padded_tokens": float(padded),
                      "learner/unique_tokens": float(unique_tokens([s for mb in mini_batches for s in mb]))})
        return stats

    def sft_update(self, sequences: list[Sequence], images: list[Any], lr: float, max_tokens: int = 0) -> dict[str, float]:
        """One supervised optimizer step; micro-batches by padded token count when `max_tokens` > 0."""
        if len(sequences) < self.world_size:
            raise ValueError(f"an SFT step needs at least one example per learner rank ({self.world_size}); "
                             f"got {len(sequences)}")
        shards = self._shards(sequences, images, max_tokens)
        return _sum(ray.get([a.sft_update.remote(s, lr) for a, s in zip(self.ranks, shards)]))

    def start_rl_stage(self) -> None:
        ray.get([a.start_rl_stage.remote() for a in self.ranks])

    def gather_weights(self) -> None:
        """Before every weight sync (a collective under ZeRO-3; nothing otherwise)."""
        ray.get([a.gather_weights.remote() for a in self.ranks])

    @property
    def weight_source(self) -> Any:
        """Rank 0, which every rollout engine takes its weights from (all ranks hold the same)."""
        return self.ranks[0]

    def save(self, path: str) -> str:
        return ray.get([a.save.remote(path) for a in self.ranks])[0]

    def save_state(self, path: str) -> None:
        ray.get([a.save_state.remote(path) for a in self.ranks])

    def load_state(self, path: str) -> None:
        ray.get([a.load_state.remote(path) for a in self.ranks])

    def shutdown(self) -> None:
        for a in self.ranks:
            ray.kill(a)
        remove_placement_group(self._pg)


def _sum(parts: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out
