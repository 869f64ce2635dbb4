"""rollout → reward → filter, streamed.

Prompt groups go to the rollout pool; each group is scored as soon as it completes and kept or
dropped at once. With DAPO dynamic sampling a group whose filter metric (accuracy, never a
length-shaped score) has zero variance is dropped, and new prompts are submitted as capacity frees
up (streaming refill, no whole-batch regeneration); qualified groups beyond the step's need carry
over to the next step. After `max_sampling_rounds × prompts_per_step` prompts the step trains on
what qualified and warns — it never aborts silently and never trains on a zero-variance group.

With rollout.max_staleness=1 (one-step-off) `prefetch` submits the next step's prompts as soon as a
step's sampling is done, and `finish_prefetch` waits for them before the engines take the new
weights; the next `sample` scores and files them first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import algorithms as A
from engine.config import Config
from engine.data import Prompt, PromptStream
from engine.metrics import PhaseTimer
from rewards import RewardInput, RewardRunner
from rollout.pool import RolloutPool
from rollout.records import GroupRequest, GroupResult, from_record, to_record

log = logging.getLogger("pathorl.sampler")


@dataclass
class ScoredGroup:
    """A prompt's group of samples with its rewards."""

    prompt: Prompt
    result: GroupResult
    texts: list[str]
    scores: list[float | None]
    """Reward per sample; None = excluded after a reward error."""
    components: dict[str, list[float | None]]
    step: int = 0
    """The RL step whose weights generated the group (it may be trained at a later step)."""
    old_logprobs: dict[int, list[float]] = field(default_factory=dict)
    """Sample index -> its log-probs under the generating policy, recorded for a group that carries
    over, before the update that makes its policy stale (π_old of the PPO ratio)."""

    @property
    def response_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.result.samples)


@dataclass
class SamplingStats:
    """Cumulative counters behind the `dapo/*` metrics."""

    tokens_generated: int = 0
    tokens_dropped: int = 0
    tokens_qualified: int = 0
    tokens_trained: int = 0
    groups_finished: int = 0
    groups_kept: int = 0
    groups_dropped: int = 0
    groups_carried: int = 0
    groups_expired: int = 0
    cap_hits: int = 0


@dataclass
class StepRollout:
    """What one step's sampling produced."""

    groups: list[ScoredGroup] = field(default_factory=list)
    """Qualified groups to train on."""
    seen: list[ScoredGroup] = field(default_factory=list)
    """Every group scored this step (the population of the reward metrics)."""
    generation_errors: list[str] = field(default_factory=list)
    failed: list[tuple[Prompt, GroupResult]] = field(default_factory=list)
    """Groups whose generation failed (logged with their error)."""
    carried: list[ScoredGroup] = field(default_factory=list)
    """Qualified groups scored this step and kept for a later one."""
    expired: list[ScoredGroup] = field(default_factory=list)
    """Groups carried from an earlier step and dropped now, since with rollout.max_staleness=1 no
    group is trained more than one update after its policy."""
    prefetched: int = 0
    """Groups generated during the previous step's update (rollout.max_staleness=1)."""
    reward_errors: int = 0


def start_pool(cfg: Config, model_path: str) -> RolloutPool:
    """The rollout pool of `cfg.rollout` serving `model_path` (engines start in the background;
    `wait_ready` blocks until they are up)."""
    r, gpu = cfg.rollout, bool(cfg.learner.num_gpus)
    return RolloutPool(
        model_path, r.num_workers, sampling=dict(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_new_tokens),
        dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len, seed=r.seed, kv_cache_gib=r.kv_cache_gib,
        gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
        tensor_parallel_size=r.tensor_parallel_size, num_cpus_per_worker=r.num_cpus_per_worker,
        num_gpus_per_worker=1.0 if gpu else 0.0,
        env_vars=None if gpu else {"OMP_NUM_THREADS": str(r.cpu_threads or os.cpu_count())},
        weight_transport=r.weight_sync if r.weight_sync != "auto" else ("broadcast" if gpu else "object_store"),
        bucket_mb=r.weight_sync_bucket_mb, max_images_per_prompt=cfg.data.max_images_per_prompt,
        placement_timeout_s=cfg.trainer.placement_timeout_s, resources=r.resources)


def log_reward_errors(errors: list, n_samples: int, most: int = 5) -> None:
    """One warning per distinct failure of a scoring call (reward, kind and message; the first
    `most` of them, then how many more), so a reward that fails is seen in the log, not only as a
    count in reward/errors."""
    distinct: dict[tuple[str, str, str], int] = {}
    for e in errors:
        key = (e.reward, e.kind, e.message)
        distinct[key] = distinct.get(key, 0) + 1
    for (reward, kind, message), count in list(distinct.items())[:most]:
        log.warning("reward %r failed on %d of %d samples (%s): %s", reward, count, n_samples, kind, message)
    if len(distinct) > most:
        log.warning("... and %d more distinct reward failures in this batch", len(distinct) - most)


def rollout_seed(run_seed: int, uid: str, epoch: int) -> int:
    """vLLM seed of a training group: a function of (run seed, row id, epoch) alone, so a resumed run
    samples what the uninterrupted run sampled; vLLM gives sample i of the group seed + i."""
    digest = hashlib.sha256(f"{run_seed}/{uid}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:6], "big") << 8

class GroupSampler:
    def __init__(self, cfg: Config, pool: Any, stream: PromptStream, rewards: RewardRunner, tokenizer: Any):
        self.cfg, self.pool, self.stream, self.rewards, self.tokenizer = cfg, pool, stream, rewards, tokenizer
        self.stats = SamplingStats()
        self.carry: list[ScoredGroup] = []
        self._ahead: dict[str, Prompt] = {}
        """rollout.max_staleness=1: the next step's groups submitted by `prefetch` (request uid -> prompt)."""
        self._ahead_results: list[GroupResult] = []
        self._ahead_step = 0
        self._uid = 0
        self._step = 0

    def submit(self, prompts: list[Prompt], n: int, sampling: dict | None = None) -> dict[str, Prompt]:
        """Sends prompts to the pool; returns them by request uid (row id + a counter, unique).
        With rollout.group_seeds every group gets its own seed (`rollout_seed`) unless `sampling`
        names one; greedy requests ignore it."""
        by_uid = {}
        for p in prompts:
            self._uid += 1
            by_uid[f"{p.uid}#{self._uid}"] = p
        seeded = self.cfg.rollout.group_seeds
        self.pool.submit([GroupRequest(uid=u, prompt=p.text, images=p.images, n=n, sampling={
            **({"seed": rollout_seed(self.cfg.trainer.seed, p.uid, p.epoch)} if seeded else {}), **(sampling or {})})
            for u, p in by_uid.items()])
        return by_uid

    def score(self, results: list[GroupResult], inflight: dict[str, Prompt], out: StepRollout,
              step: int | None = None, training: bool = True) -> list[ScoredGroup]:
        """Rewards for finished groups, stamped with the step whose weights generated them (None: the
        step being sampled); groups whose generation failed are reported and skipped, and, for
        `training` prompts, marked failed in the training stream (an evaluation row never is)."""
        groups, inputs = [], []
        for res in results:
            prompt = inflight.pop(res.uid)
            if res.error is None and res.prompt_token_ids != prompt.prompt_ids:
                res.error = (f"vLLM's prompt ({len(res.prompt_token_ids)} tokens) differs from the processor's "
                             f"({len(prompt.prompt_ids)} tokens): image tokens and image features would not match")
            if res.error is not None:
                msg = f"row {prompt.row.get('_where', prompt.uid)}: generation failed: {res.error}"
                log.warning(msg)
                out.generation_errors.append(msg)
                out.failed.append((prompt, res))
                if training:
                    self.stream.mark_failed(prompt.uid, msg)
                continue
            texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in res.samples]
            row = {k: v for k, v in prompt.row.items() if not k.startswith("_")}
            for s, text in zip(res.samples, texts):
                inputs.append(RewardInput.from_row(len(inputs), row, text, s.token_ids,
                                                   truncated=s.finish_reason == "length"))
            groups.append(ScoredGroup(prompt, res, texts, [], {}, step=self._step if step is None else step))
        if not inputs:
            return []
        batch = self.rewards.score(inputs)
        out.reward_errors += len(batch.errors)
        log_reward_errors(batch.errors, len(inputs))
        k = 0
        for g in groups:
            n = len(g.result.samples)
            g.scores = batch.scores[k:k + n]
            g.components = {name: values[k:k + n] for name, values in batch.components.items()}
            k += n
        return groups

    def qualifies(self, g: ScoredGroup) -> bool:
        """A group is trained on when some sample has a reward and, with dynamic sampling, its filter
        metric varies across the samples that have one."""
        if all(s is None for s in g.scores):
            return False
        if not self.cfg.algorithm.dynamic_sampling:
            return True
        metric = [m for m, s in zip(g.components[self.cfg.algorithm.filter_metric], g.scores) if s is not None]
        if len(metric) < 2:
            return False
        values = torch.tensor([math.nan if m is None else m for m in metric], dtype=torch.float64)
        return not bool(A.zero_variance_groups(values, torch.zeros(len(values), dtype=torch.long))[0])

    def sample(self, timer: PhaseTimer, step: int) -> StepRollout:
        """Streams groups until the step has `prompts_per_step` qualified ones (carried-over groups
        first); groups generated now are stamped with `step`."""
        cfg, st, out = self.cfg, self.stats, StepRollout()
        self._step = step
        need, n = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        dynamic = cfg.algorithm.dynamic_sampling
        out.groups, self.carry = self.carry[:need], self.carry[need:]
        budget = need * (cfg.algorithm.max_sampling_rounds if dynamic else 1)
        inflight: dict[str, Prompt] = {}
        submitted = out.prefetched = len(self._ahead)
        if self._ahead:
            ahead, results, self._ahead, self._ahead_results = self._ahead, self._ahead_results, {}, []
            with timer("reward"):
                groups = self.score(results, ahead, out, self._ahead_step)
            with timer("filter"):
                self._file(groups, out, need)
        while len(out.groups) < need:
            # Expected qualified groups among those in flight, from the run's keep rate so far.
            keep_rate = (st.groups_kept + 1) / (st.groups_finished + 2) if dynamic else 1.0
            missing = need - len(out.groups) - math.floor(len(inflight) * keep_rate)
            want = min(budget - submitted, math.ceil(max(0, missing) / max(keep_rate, 0.25)))
            if want > 0:
                with timer("data"):
                    inflight.update(self.submit(self.stream.take(want), n))
                submitted += want
            if not inflight:
                if not out.groups and len(out.generation_errors) >= submitted:
                    raise RuntimeError("every prompt of the step failed to generate:\n  "
                                       + "\n  ".join(out.generation_errors[:5]))
                st.cap_hits += 1
                log.warning("sampling: %d of %d groups qualified after %d prompts (algorithm.max_sampling_rounds=%d);"
                            " training on those", len(out.groups), need, submitted, cfg.algorithm.max_sampling_rounds)
                break
            self._collect(timer, inflight, out, need)
        while inflight:  # groups already generating finish under the current weights and carry over
            self._collect(timer, inflight, out, need)
        self._expire(out)
        for g in out.seen:  # every scored group: the all-right and all-wrong ones are those to skip
            accuracy = g.components.get(cfg.algorithm.filter_metric, [])
            self.stream.record_pass_rate(g.prompt.uid, [a for a in accuracy if a is not None])
        return out

    def _collect(self, timer: PhaseTimer, inflight: dict[str, Prompt], out: StepRollout, need: int) -> None:
        with timer("rollout"):
            results = self.pool.results()
        with timer("reward"):
            groups = self.score(results, inflight, out)
        with timer("filter"):
            self._file(groups, out, need)

    def _file(self, groups: list[ScoredGroup], out: StepRollout, need: int) -> None:
        """Each scored group is trained this step, carried over, or dropped."""
        st = self.stats
        for g in groups:
            out.seen.append(g)
            st.groups_finished += 1
            st.tokens_generated += g.response_tokens
            if self.qualifies(g):
                st.groups_kept += 1
                st.tokens_qualified += g.response_tokens
                if len(out.groups) < need:
                    out.groups.append(g)
                else:
                    self.carry.append(g)
                    out.carried.append(g)
                    st.groups_carried += 1
            else:
                st.groups_dropped += 1
                st.tokens_dropped += g.response_tokens

    def _expire(self, out: StepRollout) -> None:
        """Drops carried groups generated before this step, which the next step would train two
        updates after their policy: no group trains more than one update stale. This happens only
        when more groups carry over than a step trains (synchronous dynamic sampling after its keep
        rate jumps; with rollout.max_staleness=1 `prefetch` leaves room for the carried ones)."""
        stale = {id(g) for g in self.carry if g.step < self._step}
        if not stale:
            return
        seen = {id(g) for g in out.seen}
        out.expired = [g for g in self.carry if id(g) in stale and id(g) not in seen]
        out.carried = [g for g in out.carried if id(g) not in stale]
        self.carry = [g for g in self.carry if id(g) not in stale]
        self.stats.groups_expired += len(stale)
        log.warning("sampling: %d carried groups dropped: they would train two updates after the policy that "
                    "generated them", len(stale))

    def prefetch(self) -> None:
        """rollout.max_staleness=1, once the step's sampling is done: submits the next step's prompts
        (as many as its carried groups leave to fill) so that the engines generate them on the
        current weights while the learner trains."""
        want = self.cfg.rollout.prompts_per_step - len(self.carry)
        if want > 0:
            self._ahead = self.submit(self.stream.take(want), self.cfg.rollout.group_size)
            self._ahead_step = self._step

    def finish_prefetch(self) -> None:
        """Waits until the prefetched groups are generated: an engine takes new weights only between
        groups, so each group comes from one policy."""
        while self.pool.outstanding:
            self._ahead_results += self.pool.results()

    def generate(self, prompts: list[Prompt], n: int, sampling: dict | None = None) -> StepRollout:
        """Generates and scores `prompts` outside the training stream (evaluation)."""
        out = StepRollout()
        inflight = self.submit(prompts, n, sampling)
        while inflight:
            out.seen += self.score(self.pool.results(), inflight, out, training=False)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Counters and the carried-over groups (tokens, log-probs, rewards; prompts by row position and id)."""
        carry = [{"uid": g.prompt.uid, "index": g.prompt.index, "epoch": g.prompt.epoch, "result": to_record(g.result),
                  "texts": g.texts, "scores": g.scores, "components": g.components, "step": g.step,
                  "old_logprobs": g.old_logprobs}
                 for g in self.carry]
        if len(self._ahead_results) != len(self._ahead):
            raise RuntimeError("sampler state taken while prefetched groups are generating (call finish_prefetch)")
        ahead = [{"uid": self._ahead[r.uid].uid, "index": self._ahead[r.uid].index,
                  "epoch": self._ahead[r.uid].epoch, "result": to_record(r)} for r in self._ahead_results]
        return {"stats": dataclasses.asdict(self.stats), "uid": self._uid, "carry": carry, "ahead": ahead,
                "ahead_step": self._ahead_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = SamplingStats(**state["stats"])
        self._uid = state["uid"]
        self.carry = [ScoredGroup(self._prompt_of(c), from_record(c["result"]), c["texts"], c["scores"],
                                  c["components"], step=c["step"], old_logprobs=c["old_logprobs"])
                      for c in state["carry"]]
        self._ahead_results = [from_record(c["result"]) for c in state.get("ahead", [])]
        self._ahead = {r.uid: self._prompt_of(c) for r, c in zip(self._ahead_results, state.get("ahead", []))}
        self._ahead_step = state.get("ahead_step", 0)

    def _prompt_of(self, c: dict[str, Any]) -> Prompt:
        """The prompt of a checkpointed group, rebuilt from its row position and checked by row id."""
        if "index" not in c:
            raise ValueError(f"the checkpoint carries a group of row {c['uid']!r} without its row position "
                             "(written before rows were read lazily, 2026-12-01): resume it with the pathorl "
                             "version that wrote it, or start afresh with trainer.resume=off")
        row = self.stream.row_at(c["index"])
        if row["id"] != c["uid"]:
            raise ValueError(f"the checkpoint carries a group of row {c['uid']!r}, but data.train's row "
                             f"{c['index']} is {row['id']!r}: the training data changed")
        prompt = self.stream.builder.build(row)
        prompt.epoch, prompt.index = c["epoch"], c["index"]
        return prompt

    def metrics(self) -> dict[str, float]:
        st = self.stats
        return {
            "dapo/yield": st.tokens_trained / max(st.tokens_qualified, 1),
            "dapo/filtered_frac": st.tokens_dropped / max(st.tokens_generated, 1),
            "dapo/groups_dropped": float(st.groups_dropped),
            "dapo/groups_carried": float(st.groups_carried),
            "dapo/groups_expired": float(st.groups_expired),
            "dapo/cap_hits": float(st.cap_hits),
            "data/skipped_solved": float(self.stream.skipped_solved),
        }
