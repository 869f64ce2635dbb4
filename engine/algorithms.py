"""The RL maths: stateless tensor functions, picked by name from config.

Shapes: B sequences (responses) in a step, grouped by prompt; N response tokens in a (micro-)batch,
flattened. Everything here is plain torch, runs on CPU and is tested against hand-derived cases.

    advantages = ADVANTAGES[cfg.advantage](rewards[B], group[B], lengths[B], eps)  -> [B]
    loss_t, clipped = ppo_clip_loss(logp[N], old[N], adv[N], lo, hi, dual)  -> [N], [N]
    loss = (loss_t * token_weights(...)).sum()                              (global normaliser inside)
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from kernels.reference import KL_ESTIMATORS
from rewards import overlong_penalty

ADVANTAGES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {}
"""Advantage estimators by name. Each takes rewards [B] (NaN/inf: a failed reward), prompt-group ids
[B], response lengths [B] (tokens; the population of token-level normalisations) and eps, and
returns one advantage per response [B], broadcast over its tokens by the loss."""
WHITEN_EPS = 1e-8
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def register_advantage(name: str):
    """Registers an estimator under `name`, behind one check of its inputs: rewards, group and
    lengths 1-D of one length (a ValueError naming the mismatch otherwise). An empty batch gives an
    empty result; integer or bool rewards give floating advantages (torch's default dtype)."""
    def wrap(fn):
        @functools.wraps(fn)
        def checked(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor, *args, **kwargs):
            shapes = {"rewards": tuple(rewards.shape), "group": tuple(group.shape), "lengths": tuple(lengths.shape)}
            if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
                raise ValueError(f"advantage {name!r}: rewards, group and lengths must be 1-D of one length, got {shapes}")
            if not rewards.is_floating_point():
                rewards = rewards.to(torch.get_default_dtype())
            if rewards.numel() == 0:
                return rewards.clone()
            return fn(rewards, group, lengths, *args, **kwargs)

        ADVANTAGES[name] = checked
        return checked
    return wrap


def _group_stats(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (size, sum, mean) over the finite rewards of the sample's group; rewards [B] fp64,
    group ids [B]. A NaN/inf reward (a failed reward function) takes no part in its group's baseline."""
    finite = torch.isfinite(rewards)
    values = torch.where(finite, rewards, torch.zeros_like(rewards))
    _, inverse = torch.unique(group, return_inverse=True)
    size = torch.zeros(int(inverse.max()) + 1, dtype=rewards.dtype).index_add_(0, inverse, finite.to(rewards.dtype))
    total = torch.zeros_like(size).index_add_(0, inverse, values)
    return size[inverse], total[inverse], (total / size.clamp(min=1))[inverse]


def _finite_or_zero(adv: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """0 where the sample's own reward is not finite or its group has no baseline (`valid` False)."""
    return torch.where(valid & torch.isfinite(rewards), adv, torch.zeros_like(adv))


@register_advantage("grpo")
def grpo_advantage(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i − mean_g) / (std_g + eps), std unbiased (n − 1) as in the GRPO paper and verl; a
    group of one sample gets 0 (no baseline to compare with). rewards [B], group [B] -> [B]."""
    r = rewards.double()
    size, _, mean = _group_stats(r, group)
    centred = torch.where(torch.isfinite(r), r - mean, torch.zeros_like(r))
    _, inverse = torch.unique(group, return_inverse=True)
    sq = torch.zeros(int(inverse.max()) + 1, dtype=r.dtype).index_add_(0, inverse, centred ** 2)[inverse]
    std = torch.sqrt(sq / (size - 1).clamp(min=1))
    return _finite_or_zero(centred / (std + eps), r, size > 1).to(rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor,
                      eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO: A_i = r_i − mean_g (no std division, which up-weights near-solved groups)."""
    r = rewards.double()
    size, _, mean = _group_stats(r, group)
    return _finite_or_zero(r - mean, r, size > 0).to(rewards.dtype)


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RLOO: A_i = r_i − (Σ_g r − r_i)/(G − 1), the mean of the other samples; 0 for a group of one."""
    r = rewards.double()
    size, total, _ = _group_stats(r, group)
    adv = r - (total - torch.where(torch.isfinite(r), r, torch.zeros_like(r))) / (size - 1).clamp(min=1)
    return _finite_or_zero(adv, r, size > 1).to(rewards.dtype)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantage(rewards: torch.Tensor, group: torch.Tensor, lengths: torch.Tensor,
                                    eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ with baseline (arXiv 2501.03262; OpenRLHF `_normalize_advantages`, verl
    `compute_reinforce_plus_plus_baseline_outcome_advantage`): x_i = r_i − mean_g, broadcast to the
    response's |y_i| tokens, then whitened over ALL valid tokens of the step:

        μ = Σ_i |y_i|·x_i / N,   σ² = Σ_i |y_i|·(x_i − μ)² / (N − 1),   A_i = (x_i − μ) / sqrt(σ² + 1e-8)

    with N = Σ_i |y_i| (token-weighted, unbiased). A response with a non-finite reward or no tokens
    takes no part and gets 0. `eps` is unused: the whitening constant is the anchors' 1e-8. A group
    of one sample centres to x = 0 here (verl keeps its raw reward there, as its GRPO does; see
    `grpo_advantage`), so such a batch whitens differently from verl's."""
    r = rewards.double()
    _, _, mean = _group_stats(r, group)
    valid = torch.isfinite(r) & (lengths > 0)
    x = torch.where(valid, r - mean, torch.zeros_like(r))
    n = torch.where(valid, lengths.double(), torch.zeros_like(r))
    total = n.sum()
    mu = (n * x).sum() / total.clamp(min=1)
    var = (n * (x - mu) ** 2).sum() / (total - 1).clamp(min=1)
    return torch.where(valid, (x - mu) / torch.sqrt(var + WHITEN_EPS), torch.zeros_like(r)).to(rewards.dtype)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                  clip_high: float, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped loss (to minimise) with asymmetric clip (DAPO clip-higher) and optional
    dual clip. All [N]. Returns (loss [N], clipped [N] bool: the clipped branch was taken).

        ρ = exp(logp − old);  loss = −min(ρ·A, clip(ρ, 1 − lo, 1 + hi)·A)
        dual clip (A < 0):    loss = min(loss, −c·A)
    """
    if not (logp.shape == old_logp.shape == advantages.shape):
        raise ValueError(f"ppo_clip_loss: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have one shape (one value per token)")
    if not (0 <= clip_low <= 1 and clip_high >= 0) or (dual_clip is not None and not dual_clip > 1):
        raise ValueError(f"ppo_clip_loss: needs 0 <= clip_low <= 1, clip_high >= 0 and dual_clip > 1 or None; got "
                         f"clip_low={clip_low}, clip_high={clip_high}, dual_clip={dual_clip}")
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def token_weights(mode: str, seq_index: torch.Tensor, seq_lengths: torch.Tensor, num_seqs: int, num_tokens: int,
                  max_response_len: int) -> torch.Tensor:
    """Weights w [N] such that the step's loss is Σ_t w_t·loss_t over the tokens of a micro-batch.

    seq_index [N]: which sequence each token belongs to (indexes seq_lengths); seq_lengths [S]: the
    number of loss tokens of each sequence of the micro-batch. num_seqs / num_tokens: sequences and
    loss tokens of the WHOLE optimizer step (all micro-batches, all ranks), so the sum over any split
    is the same update:
        token_mean               w = 1 / num_tokens                          (DAPO)
        seq_mean_token_mean      w = 1 / (num_seqs · |y_i|)                   (GRPO sample-level)
        seq_mean_token_sum       w = 1 / num_seqs                            (verl's seq-mean-token-sum)
        seq_mean_token_sum_norm  w = 1 / (num_seqs · max_response_len)        (Dr. GRPO)
    The names are verl's `agg_loss` modes (verl/trainer/ppo/core_algos.py) with underscores. For
    seq_mean_token_sum_norm we follow the Dr. GRPO paper (arXiv 2503.20783) and TRL's "dr_grpo"
    loss, Σ / (B · L_max); verl's agg_loss divides the step's sum by L_max alone (B times larger,
    a constant factor Adam absorbs but gradient clipping does not).
    """
    if seq_index.numel() and (num_seqs < 1 or num_tokens <= 0 or max_response_len < 1
                              or int(seq_index.max()) >= len(seq_lengths) or int(seq_index.min()) < 0):
        raise ValueError(f"token_weights: {seq_index.numel()} tokens need num_seqs >= 1, num_tokens > 0, "
                         f"max_response_len >= 1 and seq_index within seq_lengths ({len(seq_lengths)} sequences); got "
                         f"num_seqs={num_seqs}, num_tokens={num_tokens}, max_response_len={max_response_len}, "
                         f"seq_index in [{int(seq_index.min())}, {int(seq_index.max())}]")
    if mode == "token_mean":
        return torch.full(seq_index.shape, 1.0 / num_tokens, dtype=torch.float64, device=seq_index.device)
    if mode == "seq_mean_token_mean":
        return 1.0 / (num_seqs * seq_lengths.double().clamp(min=1)[seq_index])
    if mode == "seq_mean_token_sum":
        return torch.full(seq_index.shape, 1.0 / num_seqs, dtype=torch.float64, device=seq_index.device)
    if mode == "seq_mean_token_sum_norm":
        return torch.full(seq_index.shape, 1.0 / (num_seqs * max_response_len), dtype=torch.float64,
                          device=seq_index.device)
    raise ValueError(f"algorithm.loss_agg must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate [N] ("k1" | "k2" | "k3", k3 being verl's clamped low_var_kl)."""
    return KL_ESTIMATORS[estimator](logp - ref_logp)


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling [N]: min(π_old/π_rollout, cap), correcting for the rollout
    engine sampling from a slightly different distribution than the learner computes."""
    if not cap > 0:
        raise ValueError(f"tis_weights: cap must be > 0 (algorithm.tis_cap >= 1), got {cap}")
    return torch.exp((old_logp - rollout_logp).clamp(max=math.log(cap)))


def overlong_shaping(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong penalty per response [B] (0, linear in the buffer, −factor at the limit)."""
    return torch.tensor([overlong_penalty(int(n), max_length, buffer, factor) for n in lengths], dtype=torch.float64)


def zero_variance_groups(metric: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-sample bool [B]: True where the sample's group has the same `metric` on every sample
    (DAPO drops those groups: zero advantage, no signal). NaN metrics never count as equal.
    Unlike verl's DAPO filter (recipe/dapo, std of the metric > 0, singletons kept) a group of one
    counts as equal (its advantage is 0 here), a group with a NaN metric is kept (its finite
    samples still compare), and equal values are compared exactly, not through a float std."""
    m = metric.double()
    if m.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    _, inverse = torch.unique(group, return_inverse=True)
    n = int(inverse.max()) + 1
    lo = torch.full((n,), math.inf, dtype=m.dtype).scatter_reduce(0, inverse, m, "amin")
    hi = torch.full((n,), -math.inf, dtype=m.dtype).scatter_reduce(0, inverse, m, "amax")
    has_nan = torch.zeros(n, dtype=torch.bool).index_put_((inverse,), torch.isnan(m), accumulate=True)
    return ((lo == hi) & ~has_nan)[inverse]
